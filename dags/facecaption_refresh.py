"""Refresh DAG: on a schedule (setting `refresh.schedule`, daily by default), re-plan the
configured sources so that new files add their shards, then run exactly the work that is not
up to date: new or failed shards, stages whose fingerprint changed (a model, threshold,
grammar or prompt), and fetch rows that failed transiently. Up-to-date work is never re-run.
All logic lives in the `facecaption` package; this file only wires it up."""

from __future__ import annotations

from typing import Any

from airflow.sdk import dag, task
from facecaption_airflow.chunks import chunk_params
from facecaption_airflow.failures import fail_at_once_if_permanent
from facecaption_airflow.tasks import (
    DAG_DEFAULTS,
    max_shards_param,
    planned_shard_ids,
    process_shards,
)

from facecaption.settings import Settings


@dag(
    dag_id="facecaption_refresh",
    description="Scheduled: new source files, stale stages, retryable rows; nothing else.",
    schedule=Settings().refresh.schedule,
    max_active_runs=1,
    **DAG_DEFAULTS,
    params={
        "max_shards": max_shards_param(),
        **chunk_params(),
    },
)
def facecaption_refresh() -> None:
    @task
    @fail_at_once_if_permanent()
    def find_work(**context: Any) -> list[str]:
        from facecaption.core.pipeline import Pipeline, WorkSelection
        from facecaption.models.preflight import require_stage_models

        with Pipeline.open() as pipeline:
            require_stage_models(pipeline.settings)  # a missing model fails here, not per shard
            sources = pipeline.settings.refresh.sources
            params = context["params"]
            # new files add their shards (the chain's first run plans them); a file that
            # cannot be planned is reported
            plan_errors = pipeline.plan(sources).errors if sources and not params["after"] else {}
            work = pipeline.select_work(
                status="work", max_shards=params["max_shards"], after=params["after"]
            )
        return planned_shard_ids(WorkSelection(work.shard_ids, plan_errors), context)

    process_shards(find_work(), retry_transient=True)


facecaption_refresh()
