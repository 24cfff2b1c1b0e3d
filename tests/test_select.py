"""Choosing work: by stages, by status (pending, failed, stale) and with a cap; and the build
DAG running only the chosen shards and stages."""

from __future__ import annotations

import pytest
from support.sampledata import write_source
from support.tiny_classifier import build_tiny_vit

from facecaption.core.fingerprints import Fingerprints, LiveStageInputs, current_fingerprint
from facecaption.core.pipeline import Pipeline
from facecaption.core.stage import stage_registry


def build_all(tmp_path, settings, sample, sample_site):
    """Three shards of the sample source, every stage done (offline models); returns
    (settings, shard ids, source)."""
    settings = settings.model_copy(update={"shard_size": 8})
    source = write_source(sample, sample_site.url("").rstrip("/"), tmp_path / "laion.parquet")
    with Pipeline.open(settings) as pipeline:
        shard_ids = pipeline.select_shards([str(source)])
        for shard_id in shard_ids:
            for stage in pipeline.stage_names:
                pipeline.run(stage, shard_id)
    return settings, shard_ids, source


@pytest.fixture
def built(tmp_path, settings, sample, sample_site):
    return build_all(tmp_path, settings, sample, sample_site)


def test_nothing_is_pending_failed_or_stale_after_a_full_build(built):
    settings, shard_ids, _ = built
    with Pipeline.open(settings) as pipeline:
        assert pipeline.select_work(status="all").shard_ids == shard_ids
        for status in ("pending", "failed", "stale"):
            assert pipeline.select_work(status=status).shard_ids == [], status


def test_failed_work_is_selected_by_stage(built):
    settings, shard_ids, _ = built
    with Pipeline.open(settings) as pipeline:
        state = pipeline.state
        with state.claim(shard_ids[1], "caption"):
            attempt = state.mark_running(shard_ids[1], "caption", "fp", "w")
            state.mark_failed(shard_ids[1], "caption", attempt, "RuntimeError: boom")
        assert pipeline.select_work(status="failed").shard_ids == [shard_ids[1]]
        assert pipeline.select_work(status="pending").shard_ids == [shard_ids[1]]
        assert pipeline.select_work(status="failed", stages=["fetch", "detect"]).shard_ids == []


def test_a_changed_threshold_makes_exactly_that_stage_stale(built):
    settings, shard_ids, _ = built
    stricter = settings.attribute.model_copy(update={"threshold": 0.9})
    with Pipeline.open(settings.model_copy(update={"attribute": stricter})) as pipeline:
        assert pipeline.select_work(status="stale", stages=["attribute"]).shard_ids == shard_ids
        assert pipeline.select_work(status="stale", stages=["fetch", "detect"]).shard_ids == []
        assert pipeline.select_work(status="stale", max_shards=2).shard_ids == shard_ids[:2]
        rerun = pipeline.run("attribute", shard_ids[0])
        assert rerun.status == "done" and rerun.attempt == 2
        assert pipeline.select_work(status="stale", stages=["attribute"]).shard_ids == shard_ids[1:]
        # the caption stage read the old attributes: it is stale now for the rerun shard
        assert pipeline.select_work(status="stale", stages=["caption"]).shard_ids == [shard_ids[0]]


def test_model_backends_are_in_the_fingerprints_as_what_they_resolve_to(built, tmp_path):
    """A detector or attribute backend of another kind makes exactly its stage stale (the
    bulk fingerprints of selection agree with the runner's); `auto` and an unset input size
    count as what they resolve to, so spelling them out changes nothing."""
    settings, shard_ids, _ = built
    registry = stage_registry()

    def with_section(section: str, **changes):
        return settings.model_copy(
            update={section: getattr(settings, section).model_copy(update=changes)}
        )

    def fingerprints(variant, stage: str) -> list[str]:
        with Pipeline.open(variant) as pipeline:
            bulk = Fingerprints.prefetch(variant, pipeline.state, registry, None, takedowns=False)
            live = LiveStageInputs(pipeline.state)
            shards = pipeline.state.list_shards()
            found = [bulk.current(stage, shard) for shard in shards]
            assert found == [
                current_fingerprint(registry[stage], shard, variant, live) for shard in shards
            ]
            return found

    def stale(variant) -> list[str]:
        with Pipeline.open(variant) as pipeline:
            return pipeline.select_work(status="stale").shard_ids

    retinaface = with_section("detect", backend="retinaface")
    assert settings.detect.backend == "cascade" and stale(retinaface) == shard_ids
    auto = with_section("detect", backend="auto", input_size=None)  # no insightface pack here
    spelled = with_section("detect", backend="retinaface", input_size=1024)
    assert fingerprints(auto, "detect") == fingerprints(spelled, "detect")
    assert fingerprints(auto, "detect") == fingerprints(retinaface, "detect")
    assert fingerprints(auto, "detect") != fingerprints(
        with_section("detect", backend="retinaface", input_size=640), "detect"
    )
    # a transformers classifier where the ONNX model was: the attribute stage only
    vit = build_tiny_vit(tmp_path / "tiny-vit")
    transformers = with_section("attribute", model_path=str(vit), backend="transformers")
    with Pipeline.open(transformers) as pipeline:
        assert pipeline.select_work(status="stale", stages=["attribute"]).shard_ids == shard_ids
        assert pipeline.select_work(status="stale", stages=["fetch", "detect"]).shard_ids == []
    assert fingerprints(with_section("attribute", model_path=str(vit)), "attribute") == (
        fingerprints(transformers, "attribute")
    )
    assert fingerprints(settings, "attribute") == fingerprints(
        with_section("attribute", backend="onnx"), "attribute"
    )


def test_unknown_stage_or_status_is_a_clear_error(built):
    settings, _, _ = built
    with Pipeline.open(settings) as pipeline:
        with pytest.raises(ValueError, match="unknown stages"):
            pipeline.select_work(stages=["paint"])
        with pytest.raises(ValueError, match="status must be one of"):
            pipeline.select_work(status="done")


@pytest.mark.slow
def test_build_dag_runs_only_the_chosen_shard_and_stages(
    built, settings_env, monkeypatch, airflow_db
):
    """A per-shard backfill: one trigger with shard ids and stages re-runs exactly those."""
    from airflow.dag_processing.dagbag import DagBag
    from conftest import REPO

    settings, shard_ids, _ = built
    for name, value in {**settings_env, "FACECAPTION_SHARD_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("facecaption_build")
    conf = {"shard_ids": [shard_ids[2]], "stages": ["detect", "attribute"], "force": True}

    run = dag.test(run_conf=conf)

    assert run.state == "success"
    with Pipeline.open(settings) as pipeline:
        for shard_id in shard_ids:
            for stage in pipeline.stage_names:
                attempts = pipeline.state.get_stage(shard_id, stage).attempt
                again = shard_id == shard_ids[2] and stage in ("detect", "attribute")
                assert attempts == (2 if again else 1), (shard_id, stage)
