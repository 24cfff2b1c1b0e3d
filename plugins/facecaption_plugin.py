"""The facecaption Airflow plugin: registers the shard view (`facecaption_airflow.shard_view`)
with Airflow 3's api-server under `/facecaption` and adds a "Shards" link to the UI's
navigation. Everything else Airflow-facing lives in the `facecaption_airflow` package beside
this file (which `.airflowignore` keeps the plugin loader out of)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from facecaption_airflow.shard_view import create_app


class FacecaptionPlugin(AirflowPlugin):
    name = "facecaption"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/facecaption", "name": "facecaption"}]
    external_views = [
        {"name": "Shards", "href": "/facecaption/shards", "destination": "nav",
         "category": "browse"},
    ]  # fmt: skip
