"""Takedown DAG: a run with image URLs and/or image sha256s records the request in the state DB,
finds every fetched row it covers (by URL, by sha256, and by the sha256 of a requested URL's
image, so copies under other URLs go too), re-exports exactly the affected shards, publishes
the release without them and records when the request was applied and which files changed.
From the request on, fetches skip those URLs and bytes. All logic lives in the `facecaption`
package; this file only wires it up."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, task
from facecaption_airflow.failures import fail_at_once_if_permanent
from facecaption_airflow.tasks import DAG_DEFAULTS


@dag(
    dag_id="facecaption_takedown",
    description="Remove images (by URL or sha256) from every release output; fetch skips them.",
    schedule=None,
    max_active_runs=1,
    **DAG_DEFAULTS,
    params={
        "urls": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Image URLs",
            description="URLs of images to take down, one per line.",
        ),
        "sha256s": Param(
            [],
            type="array",
            items={"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
            title="Image sha256s",
            description="sha256 of image bytes (the release's image_sha256 column).",
        ),
        "reason": Param(None, type=["null", "string"], title="Reason"),
        "requested_by": Param(None, type=["null", "string"], title="Requested by"),
    },
)
def facecaption_takedown() -> None:
    @task
    @fail_at_once_if_permanent()
    def record(**context: Any) -> int:
        from facecaption.core.pipeline import Pipeline
        from facecaption.release.takedowns import request_takedown

        params = context["params"]
        with Pipeline.open() as pipeline:
            request_id = request_takedown(
                pipeline, params["urls"], params["sha256s"], params["reason"],
                params["requested_by"],
            )  # fmt: skip
        print(f"takedown request {request_id} recorded")
        return request_id

    @task
    @fail_at_once_if_permanent()
    def apply(request_id: int) -> dict[str, Any]:
        from facecaption.core.pipeline import Pipeline
        from facecaption.release.publish import publish_release
        from facecaption.release.report import write_report
        from facecaption.state.takedowns import TakedownIndex

        with Pipeline.open() as pipeline:
            publish_release(pipeline)
            write_report(pipeline)
            audit = TakedownIndex(pipeline.state.engine).get(request_id)
        if audit.applied_at is None:
            raise RuntimeError(f"takedown request {request_id} was not applied")
        print(f"request {request_id}: matched {audit.matched}; outputs {audit.outputs}")
        return {"request_id": request_id, "matched": audit.matched, "outputs": audit.outputs}

    apply(record())


facecaption_takedown()
