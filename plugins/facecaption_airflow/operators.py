"""Airflow operators for facecaption stages: one stage (or a few, in order) on one shard,
through the same `facecaption.core.pipeline.Pipeline.run` the CLI uses.

`ShardStageOperator` runs on the default (CPU) queue. GPU stages (detect, attribute and
in-process LLM captioning) use `GpuShardStageOperator`, which routes to `queue="gpu"` and the
`gpu` pool; the stage loads its model once per task, i.e. once per shard (a task is a process
of its own; see `facecaption.models.loaded`). A task may run several stages in order (a
shard's GPU stages together, `airflow.gpu_stages_in_one_task`): one process start, DAG parse
and slot for all of them.

A permanent error fails the task at once (no retries); a task instance an operator cleared
forces its stage (see `failures`).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from facecaption_airflow.failures import cleared_by_operator, fail_at_once_if_permanent


class ShardStageOperator(BaseOperator):
    """Run `stages` on `shard_id`, in order, in this one process, stopping at the first that
    fails (usually one stage; a shard's GPU stages together, see `tasks.process_shards`).
    XCom gets the outcome's ids and counts, never data: one stage's summary, or a list of
    them for several."""

    template_fields = ("shard_id", "force", "selected_stages")
    # retry_transient is fixed per DAG (the refresh sets it), not templated
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        stages: tuple[str, ...],
        shard_id: str,
        force: bool | str = False,
        selected_stages: list[str] | str | None = None,
        retry_transient: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not stages:
            raise ValueError("a shard stage task needs at least one stage")
        self.stages = tuple(stages)
        self.shard_id = shard_id
        self.force = force
        self.selected_stages = selected_stages  # None: every stage runs
        self.retry_transient = retry_transient

    def execute(self, context: Any) -> dict[str, Any] | list[dict[str, Any]]:
        from facecaption.core.pipeline import Pipeline

        force = self.force if isinstance(self.force, bool) else self.force.lower() == "true"
        summaries = {
            stage: {"shard_id": self.shard_id, "stage": stage, "status": "not_selected"}
            for stage in self.stages
            if self.selected_stages is not None and stage not in self.selected_stages
        }
        for stage in summaries:
            # Not skipped: a skip would also skip the later stages, which may be selected.
            self.log.info("%s %s: not selected in this run", stage, self.shard_id)
        to_run = [stage for stage in self.stages if stage not in summaries]
        ti = context["ti"]
        cleared = cleared_by_operator(ti.try_number, ti.max_tries, self.retries or 0)
        if to_run and not force and cleared:
            self.log.info("%s %s: cleared, so forced (try %s)", ", ".join(to_run),
                          self.shard_id, ti.try_number)  # fmt: skip
            force = True
        if to_run:
            with fail_at_once_if_permanent(), Pipeline.open() as pipeline:
                for stage in to_run:  # an exception stops here: later stages do not run
                    outcome = pipeline.run(
                        stage, self.shard_id, force=force, retry_transient=self.retry_transient
                    )
                    self.log.info("%s %s: %s %s", stage, self.shard_id, outcome.status,
                                  outcome.counts)  # fmt: skip
                    summaries[stage] = outcome.summary()
        ordered = [summaries[stage] for stage in self.stages]
        return ordered[0] if len(ordered) == 1 else ordered


class GpuShardStageOperator(ShardStageOperator):
    """A stage that needs a GPU: routed to workers listening on the `gpu` queue, one `gpu`
    pool slot each, so a GPU never runs more stages than it has room for."""

    ui_color = "#fdebd0"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("queue", "gpu")
        kwargs.setdefault("pool", "gpu")
        super().__init__(**kwargs)
