"""The facecaption Airflow plugin: a shard view inside Airflow's UI.

Airflow 3 serves the FastAPI app below from its api-server under `/facecaption`, and adds a
"Shards" link to the UI's navigation. The pages read shard state from the facecaption state
DB (never Airflow's), so they show every shard and stage with status, counts, attempts and
last error, filtered by status, stage and shard id, and each shard's attempt history with
the trigger conf that re-runs it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse


def create_app() -> FastAPI:
    app = FastAPI(title="facecaption shards")

    @app.get("/shards", response_class=HTMLResponse)
    def shards(status: str = "", stage: str = "", q: str = "") -> str:
        from facecaption.pipeline import Pipeline
        from facecaption.report import status_html

        with Pipeline.open() as pipeline:
            return status_html(pipeline.status(), status=status, stage=stage, query=q)

    @app.get("/shards/{shard_id}", response_class=HTMLResponse)
    def shard(shard_id: str) -> str:
        from facecaption.pipeline import Pipeline
        from facecaption.report import history_html
        from facecaption.state import UnknownShardError

        with Pipeline.open() as pipeline:
            try:
                pipeline.state.get_shard(shard_id)
            except UnknownShardError as error:
                raise HTTPException(status_code=404, detail=str(error)) from error
            return history_html(shard_id, pipeline.state.events(shard_id), pipeline.stage_names)

    return app


class FacecaptionPlugin(AirflowPlugin):
    name = "facecaption"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/facecaption", "name": "facecaption"}]
    external_views = [
        {"name": "Shards", "href": "/facecaption/shards", "destination": "nav",
         "category": "browse"},
    ]  # fmt: skip
