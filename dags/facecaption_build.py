"""Build DAG: plan the source, then one mapped task group per shard (fetch on CPU workers,
then detect, attribute and caption on GPU workers), then a summary. All logic lives in the
`facecaption` package; this file only wires it up."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task, task_group
from facecaption_operators import GpuShardStageOperator, ShardStageOperator

from facecaption.pipeline import WORK_STATUSES
from facecaption.settings import Settings
from facecaption.stages import stage_registry

STAGES = list(stage_registry())


@dag(
    dag_id="facecaption_build",
    description="Turn image URL lists into fetched shards (then faces, attributes, captions).",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    render_template_as_native_obj=True,  # params.force and params.stages stay bool and list
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
        "max_shards": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Max shards",
            description="Work on at most this many shards in this run.",
            section="What to work on",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force",
            description="Re-run stages that are already done with the same inputs (fetch then"
            " keeps final rows and retries only transient failures).",
            section="How",
        ),
    },
)
def facecaption_build() -> None:
    @task
    def plan(**context: Any) -> list[str]:
        from airflow.configuration import conf

        from facecaption.pipeline import Pipeline

        params = context["params"]
        source = params["source"]
        sources = [source] if isinstance(source, str) else list(source or [])
        with Pipeline.open() as pipeline:
            shard_ids = pipeline.select_work(
                sources,
                params["shard_ids"],
                stages=params["stages"],
                status=params["status"],
                max_shards=params["max_shards"],
            )
        limit = conf.getint("core", "max_map_length")
        if len(shard_ids) > limit:
            raise ValueError(
                f"{len(shard_ids)} shards but [core] max_map_length is {limit}: set Max shards"
                " (and trigger more runs), filter by status, or raise max_map_length"
            )
        return shard_ids

    @task_group
    def process_shard(shard_id: str) -> None:
        def stage(operator: type[ShardStageOperator], name: str) -> ShardStageOperator:
            return operator(
                task_id=name,
                stage=name,
                shard_id=shard_id,
                force="{{ params.force }}",
                selected_stages="{{ params.stages }}",
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
