"""What Airflow knows about the shard stages a page of the shard view shows: the latest task
instance of each (shard, stage) and the addresses of its run, its page and its log in
Airflow's UI.

The shard view is part of the api-server (a plugin app), so it reads task instances the way
Airflow's own UI routes do, through the api-server's metadata session, in one query per page;
tasks never do (Airflow 3 forbids it). A stage's task instance is found by its rendered map
index: the per-shard task group names each mapped instance by its shard id. A run with a
shard's GPU stages in one task (`GPU_TASK`) has that task for each of them, unless the run
has a task of the stage's own (caption from a model server)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import quote

from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from facecaption_airflow.failures import GPU_TASK, GPU_TASK_STAGES, STAGE_GROUP

# Task instance states that mean the stage's task did not get through, whatever the state DB
# says (a failure raised before the stage could record anything, e.g. the state DB away).
TASK_FAILED_STATES = frozenset({"failed", "upstream_failed", "up_for_retry"})


@dataclass(frozen=True)
class StageTask:
    """One mapped task instance of a shard stage."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    state: str | None

    def run_url(self, ui_base: str) -> str:
        return f"{ui_base}/dags/{quote(self.dag_id, safe='')}/runs/{quote(self.run_id, safe='')}"

    def task_url(self, ui_base: str) -> str:
        """The task instance's page (the UI's route for a mapped instance, Details tab)."""
        return f"{self._instance(ui_base)}/details"

    def log_url(self, ui_base: str) -> str:
        """The task instance's log (the instance page's first tab) of its latest try."""
        return f"{self._instance(ui_base)}?try_number={self.try_number}"

    def _instance(self, ui_base: str) -> str:
        task = quote(self.task_id, safe="")
        return f"{self.run_url(ui_base)}/tasks/{task}/mapped/{self.map_index}"


def latest_stage_tasks(
    session: Session, dag_ids: Collection[str], shard_ids: Collection[str]
) -> dict[tuple[str, str], StageTask]:
    """(shard id, stage) -> the task instance of that stage for that shard in the latest run
    of `dag_ids` that has one: one query."""
    if not dag_ids or not shard_ids:
        return {}
    ti = TaskInstance
    rendered = ti.__table__.c.rendered_map_index
    rows = session.execute(
        select(
            ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number, ti.state, rendered,
            DagRun.run_after,
        )
        .join(DagRun, and_(DagRun.dag_id == ti.dag_id, DagRun.run_id == ti.run_id))
        .where(
            ti.dag_id.in_(list(dag_ids)),
            ti.task_id.startswith(f"{STAGE_GROUP}."),
            ti.map_index >= 0,
            rendered.in_(list(shard_ids)),
        )
        .order_by(DagRun.run_after, ti.try_number)
    ).all()  # fmt: skip
    latest: dict[tuple[str, str], StageTask] = {}
    for row in rows:  # oldest first: a later run replaces an earlier one
        name = row.task_id.removeprefix(f"{STAGE_GROUP}.")
        task = StageTask(
            row.dag_id, row.run_id, row.task_id, row.map_index, row.try_number, row.state
        )
        for stage in GPU_TASK_STAGES if name == GPU_TASK else (name,):
            key = (row.rendered_map_index, stage)
            earlier = latest.get(key)
            own_task_in_this_run = (
                earlier is not None
                and (earlier.dag_id, earlier.run_id) == (row.dag_id, row.run_id)
                and earlier.task_id != row.task_id
            )
            if name != GPU_TASK or not own_task_in_this_run:
                latest[key] = task
    return latest
