"""Airflow operators for facecaption stages: one stage on one shard, through the same
`facecaption.core.pipeline.Pipeline.run` the CLI uses.

`ShardStageOperator` runs on the default (CPU) queue. GPU stages (detect now; attribute and
in-process LLM captioning next) use `GpuShardStageOperator`, which routes to `queue="gpu"` and
the `gpu` pool; the stage loads its model once per task, i.e. once per shard (a task is a
process of its own; see `facecaption.models.loaded`).

A permanent error fails the task at once (no retries); a task instance an operator cleared
forces its stage (see `failures`).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from facecaption_airflow.failures import cleared_by_operator, fail_at_once_if_permanent


class ShardStageOperator(BaseOperator):
    """Run `stage` on `shard_id`; XCom gets the outcome's ids and counts, never data."""

    template_fields = ("shard_id", "force", "selected_stages")
    # retry_transient is fixed per DAG (the refresh sets it), not templated
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        stage: str,
        shard_id: str,
        force: bool | str = False,
        selected_stages: list[str] | str | None = None,
        retry_transient: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stage = stage
        self.shard_id = shard_id
        self.force = force
        self.selected_stages = selected_stages  # None: every stage runs
        self.retry_transient = retry_transient

    def execute(self, context: Any) -> dict[str, Any]:
        from facecaption.core.pipeline import Pipeline

        force = self.force if isinstance(self.force, bool) else self.force.lower() == "true"
        if self.selected_stages is not None and self.stage not in self.selected_stages:
            # Not skipped: a skip would also skip the later stages, which may be selected.
            self.log.info("%s %s: not selected in this run", self.stage, self.shard_id)
            return {"shard_id": self.shard_id, "stage": self.stage, "status": "not_selected"}
        ti = context["ti"]
        if not force and cleared_by_operator(ti.try_number, ti.max_tries, self.retries or 0):
            self.log.info("%s %s: cleared, so forced (try %s)", self.stage, self.shard_id,
                          ti.try_number)  # fmt: skip
            force = True
        with fail_at_once_if_permanent(), Pipeline.open() as pipeline:
            outcome = pipeline.run(
                self.stage, self.shard_id, force=force, retry_transient=self.retry_transient
            )
        self.log.info("%s %s: %s %s", self.stage, self.shard_id, outcome.status, outcome.counts)
        return outcome.summary()


class GpuShardStageOperator(ShardStageOperator):
    """A stage that needs a GPU: routed to workers listening on the `gpu` queue, one `gpu`
    pool slot each, so a GPU never runs more stages than it has room for."""

    ui_color = "#fdebd0"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("queue", "gpu")
        kwargs.setdefault("pool", "gpu")
        super().__init__(**kwargs)
