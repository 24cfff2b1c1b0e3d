"""Any number of shards in one trigger: a run maps at most one chunk of its selection (no more
than `[core] max_map_length` shards, or the `chunk_size` param), and its last task triggers
the next run of the same DAG with the same conf plus `after` (the chunk's last shard) and what
is left of `max_shards`, until no shard remains. One trigger thus works through any selection
as a chain of runs, each an ordinary run: one mapped task group per shard (clear one to re-run
it), its own summary and release. The plan task leaves the chunk under the XCom key
CHUNK_XCOM and prints it; each triggered run is named `<first run id>__chunk<k>` and carries a
note saying where it starts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param

# The XCom key under which a plan task leaves its Chunk (as a dict).
CHUNK_XCOM = "chunk"


def chunk_params(**extra: Any) -> dict[str, Param]:
    """The params a chained DAG declares: where its selection starts and its chunk size."""
    return {
        "after": Param(
            None,
            type=["null", "string"],
            title="After shard",
            description="Start after this shard id in the selection's order. Set by the run"
            " before in a chain; set it by hand to resume a chain that was stopped.",
            **extra,
        ),
        "chunk_size": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Shards per run",
            description="Map at most this many shards per run; the rest follow in runs this"
            " one triggers. Empty: [core] max_map_length (never more).",
            **extra,
        ),
    }


@dataclass(frozen=True)
class Chunk:
    """The shards one run of a chain maps, and how many of the selection remain after them."""

    number: int  # 1 for the run a person triggered
    first_run: str  # that run's id: every run of the chain names it
    shard_ids: list[str]
    remain: int

    def describe(self) -> str:
        if not self.shard_ids:
            return f"chunk {self.number}: no shards"
        return (
            f"chunk {self.number} of {self.first_run}: {len(self.shard_ids)} shards"
            f" {self.shard_ids[0]}..{self.shard_ids[-1]}, {self.remain} remain"
        )

    def next_conf(self, conf: Mapping[str, Any]) -> dict[str, Any] | None:
        """The conf of the run after this one: the same work, after this chunk's last shard;
        None when nothing remains."""
        if not self.remain or not self.shard_ids:
            return None
        max_shards = conf.get("max_shards")
        return {
            **conf,
            "after": self.shard_ids[-1],
            "max_shards": max_shards - len(self.shard_ids) if max_shards else None,
            "chunk": self.number + 1,
            "first_run": self.first_run,
        }


def take_chunk(shard_ids: list[str], context: Mapping[str, Any]) -> Chunk:
    """This run's chunk of a selection (`shard_ids`, the shards after `after`), pushed to XCom
    under CHUNK_XCOM with the next run's conf, and printed."""
    from airflow.configuration import conf as airflow_conf

    limit = airflow_conf.getint("core", "max_map_length")
    size = min(context["params"].get("chunk_size") or limit, limit)
    run = context["dag_run"]
    run_conf = run.conf or {}
    chunk = Chunk(
        number=int(run_conf.get("chunk", 1)),
        first_run=run_conf.get("first_run") or run.run_id,
        shard_ids=shard_ids[:size],
        remain=max(len(shard_ids) - size, 0),
    )
    print(chunk.describe())
    context["ti"].xcom_push(
        key=CHUNK_XCOM, value={**asdict(chunk), "next_conf": chunk.next_conf(run_conf)}
    )
    return chunk


class NextChunkOperator(TriggerDagRunOperator):
    """Trigger the next run of this DAG's chain with the conf the plan task `plan_task_id` left
    (see `take_chunk`); after the chain's last chunk it succeeds without triggering. It runs
    whatever happened to the shards, so a failed shard never stops the chain (the run that
    holds it says so)."""

    ui_color = "#f3e8fd"

    def __init__(self, *, plan_task_id: str, **kwargs: Any) -> None:
        kwargs.setdefault("task_id", "next_chunk")
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(
            trigger_dag_id="{{ dag_run.dag_id }}",
            logical_date=None,  # many runs of one chain, none tied to a date
            **kwargs,
        )
        self.plan_task_id = plan_task_id

    def execute(self, context: Any) -> None:
        chunk = context["ti"].xcom_pull(task_ids=self.plan_task_id, key=CHUNK_XCOM)
        if not chunk or not chunk["next_conf"]:
            # not a skip: the run's other tasks all succeeding reads as "all done"
            self.log.info("no shards remain: this run is the last of its chain")
            return
        self.conf = chunk["next_conf"]
        # named after the chain (the runs list shows it), and once only: a retry after the
        # trigger went through finds the run and skips, it does not start a second chain
        self.trigger_run_id = f"{chunk['first_run']}__chunk{self.conf['chunk']}"
        self.skip_when_already_exists = True
        self.note = (
            f"chunk {self.conf['chunk']} of {chunk['first_run']}: the {chunk['remain']} shards"
            f" after {self.conf['after']}"
        )
        self.log.info("triggering %s", self.note)
        super().execute(context)
