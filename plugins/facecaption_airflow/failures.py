"""How a facecaption DAG run tells the truth about what failed.

- A permanent error (`facecaption.core.errors.is_permanent`: a missing model, settings that
  cannot work, an unusable source, an unknown shard id) fails its task
  at once: a retry would only meet it again, later. Anything else that escapes (the state DB
  unreachable, a shard busy in another worker) keeps the task's retries.
- A task instance that an operator cleared is a re-run they asked for, so its stage is
  forced; an automatic retry after an error is not a clear and forces nothing.
- The run's last task, `check`, runs when everything else is done (after the summary and the
  release, which run for the shards that finished) and fails the run when a shard's stage
  failed, the plan failed, or a source file could not be planned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from facecaption.core.errors import is_permanent

CHECK_TASK_ID = "check"
STAGE_GROUP = "process_shard"  # the task group `tasks.process_shards` maps over shards
# With `airflow.gpu_stages_in_one_task`, the group's task that runs a shard's GPU stages in
# order: detect and attribute, and caption unless caption has a task of its own in the run.
GPU_TASK = "gpu"
GPU_TASK_STAGES = ("detect", "attribute", "caption")
FAILED = "failed"
UPSTREAM_FAILED = "upstream_failed"
SKIPPED = "skipped"
# get_task_states names a mapped task instance "{task_id}_{map_index}"
_MAPPED_KEY = re.compile(r"^(?P<task_id>.+)_(?P<map_index>\d+)$")


@contextmanager
def fail_at_once_if_permanent() -> Iterator[None]:
    """Turn a permanent error into Airflow's AirflowFailException (the task fails now, its
    retries unused); other errors pass unchanged and keep the task's retries. Usable as
    `with fail_at_once_if_permanent():` and as a decorator."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except Exception as error:
        if not is_permanent(error):
            raise
        raise AirflowFailException(f"{type(error).__name__}: {error}") from error


def cleared_by_operator(try_number: int, max_tries: int, retries: int) -> bool:
    """Whether this try of a task instance is its first since someone cleared it.

    A first run has `max_tries == retries`; an automatic retry adds a try and leaves
    `max_tries` alone; clearing sets `max_tries` to the tries so far plus `retries`. So the
    first try of a run or of a clear is the one numbered `max_tries - retries + 1` (Airflow
    counts the same way to find a task's first reschedule), and every such try but the very
    first comes from a clear. A task cleared while it was running is restarted like a retry,
    so that one does not count.
    """
    return try_number > 1 and try_number == max_tries - retries + 1


def run_failures(
    task_states: Mapping[str, str | None],
    *,
    shard_ids: list[str] | None,
    plan_task_id: str,
    shard_group_id: str,
    plan_errors: Mapping[str, str] | None = None,
    task_stages: Mapping[str, tuple[str, ...]] | None = None,
) -> list[str]:
    """What went wrong in a run, one line each, from its task states (as
    `get_task_states` gives them: task id, or `{task_id}_{map_index}` for a mapped one) and
    the plan's errors; empty when nothing did. A shard's stage names its shard id. Stages
    that did not run because an earlier one failed are only listed when nothing failed
    (someone marked a task failed and then cleared it, say). A shard's stage is never
    skipped by our tasks, so one that was skipped means the run was stopped before it ran
    (marked failed: the check is then the only task left to run). `task_stages` names the
    stages of a group task that runs more than one (`GPU_TASK`)."""
    failures = [f"could not plan {uri}: {error}" for uri, error in (plan_errors or {}).items()]
    if shard_ids is None and task_states.get(plan_task_id) == FAILED:
        failures.append(f"{plan_task_id} failed, so no shard ran (its log says why)")
    by_state: dict[str, list[str]] = {FAILED: [], UPSTREAM_FAILED: [], SKIPPED: []}
    for key, state in sorted(task_states.items(), key=lambda item: _order(item[0])):
        if state == SKIPPED and not _is_shard_instance(key, shard_group_id):
            continue  # a release after a failed plan, the stages of an empty selection
        if state in by_state and key not in (plan_task_id, CHECK_TASK_ID):
            by_state[state].append(_describe(key, shard_ids, shard_group_id, task_stages or {}))
    failures += [f"{what} failed" for what in by_state[FAILED]]
    failures += [f"{what} was skipped: the run was stopped" for what in by_state[SKIPPED]]
    if not by_state[FAILED] and shard_ids is not None:
        failures += [f"{what} did not run: upstream failed" for what in by_state[UPSTREAM_FAILED]]
    return failures


def _is_shard_instance(key: str, shard_group_id: str) -> bool:
    mapped = _MAPPED_KEY.match(key)
    return bool(mapped) and mapped["task_id"].startswith(f"{shard_group_id}.")


def _order(key: str) -> tuple[str, int]:
    mapped = _MAPPED_KEY.match(key)
    return (mapped["task_id"], int(mapped["map_index"])) if mapped else (key, -1)


def _describe(
    key: str,
    shard_ids: list[str] | None,
    shard_group_id: str,
    task_stages: Mapping[str, tuple[str, ...]],
) -> str:
    """`detect of shard <id>` for a mapped stage instance (`gpu (detect, attribute) of shard
    <id>` for one that runs several); the task id for anything else."""
    mapped = _MAPPED_KEY.match(key)
    if not mapped or not mapped["task_id"].startswith(f"{shard_group_id}."):
        return key
    stage = mapped["task_id"].removeprefix(f"{shard_group_id}.")
    index = int(mapped["map_index"])
    shard = shard_ids[index] if shard_ids and index < len(shard_ids) else f"#{index}"
    if stage in task_stages:
        stage = f"{stage} ({', '.join(task_stages[stage])})"
    return f"{stage} of shard {shard}"
