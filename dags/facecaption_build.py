"""Build DAG: plan the source, then one mapped task group per shard (fetch on CPU workers,
then detect, attribute and caption on GPU workers), then a summary. All logic lives in the
`facecaption` package; this file only wires it up."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task, task_group
from facecaption_operators import GpuShardStageOperator, ShardStageOperator

from facecaption.settings import Settings


@dag(
    dag_id="facecaption_build",
    description="Turn image URL lists into fetched shards (then faces, attributes, captions).",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["facecaption"],
    # A shard busy elsewhere or a state-DB blip is worth another try; bad URLs never fail a task.
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
    },
    params={
        "source": Param(
            None,
            type=["null", "string", "array"],
            title="Source parquet",
            description="Parquet file(s), folder or glob (any fsspec URL) with a url column."
            " Planned first; leave empty to work on shards already registered.",
        ),
        "shard_ids": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Shards",
            description="Only these shard ids (see `facecaption status`). Empty: all shards of"
            " the source, or all registered shards when no source is given.",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force",
            description="Re-run shards whose stages are already done with the same inputs.",
        ),
    },
)
def facecaption_build() -> None:
    @task
    def plan(**context: Any) -> list[str]:
        from facecaption.pipeline import Pipeline

        params = context["params"]
        source = params["source"]
        sources = [source] if isinstance(source, str) else list(source or [])
        with Pipeline.open() as pipeline:
            return pipeline.select_shards(sources, params["shard_ids"])

    @task_group
    def process_shard(shard_id: str) -> None:
        def stage(operator: type[ShardStageOperator], name: str) -> ShardStageOperator:
            return operator(
                task_id=name,
                stage=name,
                shard_id=shard_id,
                force="{{ params.force }}",
                map_index_template="{{ task.shard_id }}",
            )

        # In-process LLMs need a GPU; a model server (backend "openai") only needs a worker.
        caption_operator = (
            ShardStageOperator if Settings().caption.backend == "openai" else GpuShardStageOperator
        )
        (
            stage(ShardStageOperator, "fetch")
            >> stage(GpuShardStageOperator, "detect")
            >> stage(GpuShardStageOperator, "attribute")
            >> stage(caption_operator, "caption")
        )

    @task(trigger_rule="all_done")
    def summary(shard_ids: list[str]) -> dict[str, Any]:
        from facecaption.pipeline import Pipeline, status_totals
        from facecaption.report import format_status

        with Pipeline.open() as pipeline:
            rows = pipeline.status(shard_ids)
        print(format_status(rows))
        return status_totals(rows)

    shard_ids = plan()
    process_shard.expand(shard_id=shard_ids) >> summary(shard_ids)


facecaption_build()
