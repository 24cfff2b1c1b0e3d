"""Build DAG: plan the source, then one mapped task group per shard (fetch on CPU workers,
then detect, attribute and caption on GPU workers, then export), then a summary and the
release (parquet files, manifest, report). All logic lives in the
`facecaption` package; this file only wires it up."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from facecaption_airflow.chunks import chunk_params
from facecaption_airflow.failures import fail_at_once_if_permanent
from facecaption_airflow.tasks import (
    DAG_DEFAULTS,
    max_shards_param,
    planned_shard_ids,
    process_shards,
)

# names only: parsing this file (every task process does) imports no stage and no pyarrow
from facecaption.core.names import STAGE_NAMES, WORK_STATUSES

STAGES = list(STAGE_NAMES)


@dag(
    dag_id="facecaption_build",
    description="Image URL lists to faces, attributes, captions and a published release.",
    schedule=None,
    max_active_runs=4,
    **DAG_DEFAULTS,
    params={
        "source": Param(
            None,
            type=["null", "string", "array"],
            title="Source parquet",
            description="Parquet file(s), folder or glob (any fsspec URL) with a url column."
            " Planned first; leave empty to work on shards already registered.",
            section="What to work on",
        ),
        "shard_ids": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Shards",
            description="Only these shard ids (see `facecaption status`). Empty: all shards of"
            " the source, or all registered shards when no source is given.",
            section="What to work on",
        ),
        "status": Param(
            "all",
            type="string",
            enum=list(WORK_STATUSES),
            title="Status filter",
            description="all: every chosen shard; pending: some chosen stage not done; failed:"
            " some chosen stage failed; stale: some chosen stage done with other inputs,"
            " settings or model than now.",
            section="What to work on",
        ),
        "stages": Param(
            STAGES,
            type="array",
            items={"type": "string", "enum": STAGES},
            examples=STAGES,
            title="Stages",
            description="Stages to run; the others are left as they are.",
            section="What to work on",
        ),
        "max_shards": max_shards_param(section="What to work on"),
        **chunk_params(section="What to work on"),
        "force": Param(
            False,
            type="boolean",
            title="Force",
            description="Re-run stages that are already done with the same inputs (fetch then"
            " keeps final rows and retries only transient failures).",
            section="How",
        ),
        "publish": Param(
            True,
            type="boolean",
            title="Publish the release",
            description="At the end, publish the release parquet files, training shards (if"
            " configured), manifest and HTML report, re-exporting only what changed.",
            section="How",
        ),
    },
)
def facecaption_build() -> None:
    @task
    @fail_at_once_if_permanent()
    def plan(**context: Any) -> list[str]:
        from facecaption.core.pipeline import Pipeline
        from facecaption.models.preflight import require_stage_models

        params = context["params"]
        source = params["source"]
        sources = [source] if isinstance(source, str) else list(source or [])
        with Pipeline.open() as pipeline:
            # a missing model fails the run here, before any shard downloads anything
            require_stage_models(pipeline.settings, params["stages"])
            selection = pipeline.select_work(
                sources,
                params["shard_ids"],
                stages=params["stages"],
                status=params["status"],
                max_shards=params["max_shards"],
                after=params["after"],
            )
        return planned_shard_ids(selection, context)

    process_shards(
        plan(),
        force="{{ params.force }}",
        stages="{{ params.stages }}",
        publish="{{ params.publish }}",
    )


facecaption_build()
