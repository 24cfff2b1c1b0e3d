"""The shard view: a FastAPI app the facecaption plugin mounts under Airflow's api-server
(URL_PREFIX), shown inside Airflow's UI navigation.

Every request needs an Airflow user (the UI's `_token` session cookie, or a bearer token)
who may read the build DAG's task instances, checked by Airflow's own auth manager as
Airflow's routes do; anyone else is refused (401 without a valid token, 403 without the
permission). Its pages read shard state from the facecaption state DB, and from Airflow's
metadata only the task instances of the shards they show (`airflow_tasks`): a page of shards
x stages (status, counts, warnings, stale markers, errors, links to each stage's run, task
instance and log) and one shard's attempt history with a re-run form (`shard_pages`). The
queries per request do not grow with the shards."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Annotated

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from facecaption_airflow.airflow_tasks import latest_stage_tasks
from facecaption_airflow.shard_pages import BUILD_DAG_ID, history_html, status_html

if TYPE_CHECKING:
    from facecaption.core.pipeline import Pipeline
    from facecaption.state import ShardState

URL_PREFIX = "/facecaption"  # where the plugin mounts the app
PAGE_SIZE = 100  # shards per page of the shard view
# The DAGs that run the per-shard task group: their task instances are the stages' links.
SHARD_DAG_IDS = (BUILD_DAG_ID, "facecaption_refresh", "facecaption_takedown")

# Airflow's check for its own task-instance routes, here for the build DAG: reading shard
# state is reading what that DAG's tasks did.
CanReadShards = Depends(
    requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE, param_dag_id=BUILD_DAG_ID)
)


class SharedStates:
    """The state DBs' connections of this api-server process: one engine (and its pool) per
    state DB URL, opened at first use and kept, never one per request."""

    def __init__(self) -> None:
        self._states: dict[str, ShardState] = {}
        self._lock = threading.Lock()

    def pipeline(self) -> Pipeline:
        """A pipeline for this request: settings read now (the api-server's environment),
        the state DB's engine shared with every other request."""
        from facecaption.core.pipeline import Pipeline
        from facecaption.settings import Settings
        from facecaption.state import open_state
        from facecaption.state.db import resolve_db_url

        settings = Settings()
        url = resolve_db_url(settings)
        with self._lock:
            if url not in self._states:
                self._states[url] = open_state(settings)
            state = self._states[url]
        return Pipeline.open(settings, state=state)

    @property
    def engines(self) -> int:
        return len(self._states)


def ui_base(request: Request) -> str:
    """The path Airflow's UI and API are served under (empty at the root): the app's mount
    point without URL_PREFIX."""
    return request.scope.get("root_path", "").removesuffix(URL_PREFIX)


def readable_dag_ids(user: object) -> set[str]:
    """Of SHARD_DAG_IDS, those whose task instances the user may read."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    manager = get_auth_manager()
    return {
        dag_id
        for dag_id in SHARD_DAG_IDS
        if manager.is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.TASK_INSTANCE,
            details=DagDetails(id=dag_id),
            user=user,
        )
    }


def create_app() -> FastAPI:
    app = FastAPI(title="facecaption shards", dependencies=[CanReadShards])
    app.state.facecaption = states = SharedStates()

    @app.get("/shards", response_class=HTMLResponse)
    def shards(
        request: Request,
        user: GetUserDep,
        session: SessionDep,
        status: str = "",
        stage: str = "",
        q: str = "",
        page: Annotated[int, Query(ge=0)] = 0,
    ) -> str:
        from facecaption.core.status import stale_stages

        pipeline = states.pipeline()
        try:
            view = pipeline.status_page(
                status=status, stage=stage, contains=q, limit=PAGE_SIZE,
                offset=page * PAGE_SIZE, artifacts=False,
            )  # fmt: skip
        except ValueError as error:  # an unknown status or stage in the query
            raise HTTPException(status_code=400, detail=str(error)) from error
        shard_ids = [row.shard_id for row in view.rows]
        stale = stale_stages(pipeline, shard_ids)
        stages = pipeline.stage_names
        tasks = latest_stage_tasks(session, readable_dag_ids(user), shard_ids)
        return status_html(
            view, stale=stale, tasks=tasks, stages=stages, ui_base=ui_base(request),
            status=status, stage=stage, query=q, page_number=page, page_size=PAGE_SIZE,
        )  # fmt: skip

    @app.get("/shards/{shard_id}", response_class=HTMLResponse)
    def shard(shard_id: str, request: Request, user: GetUserDep, session: SessionDep) -> str:
        from facecaption.state import UnknownShardError

        pipeline = states.pipeline()
        try:
            pipeline.state.get_shard(shard_id)
        except UnknownShardError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error
        events = pipeline.state.events(shard_id)
        stages = pipeline.stage_names
        tasks = latest_stage_tasks(session, readable_dag_ids(user), [shard_id])
        return history_html(shard_id, events, stages, ui_base=ui_base(request), tasks=tasks)

    return app
