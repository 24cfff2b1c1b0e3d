"""The facecaption Airflow plugin: registers the shard view (`facecaption_airflow.shard_view`)
with Airflow 3's api-server under `/facecaption` and adds a "Shards" page to the UI's
navigation (Browse menu) that shows it inside the UI (an iframe under `/plugin/shards`). An
installed wheel registers it through its `airflow.plugins` entry point; a checkout's plugins
folder through `plugins/facecaption_plugin.py`."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from facecaption_airflow.shard_view import URL_PREFIX, create_app


class FacecaptionPlugin(AirflowPlugin):
    name = "facecaption"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "facecaption"}]
    # With a url_route the UI embeds the view in its own page; without one it would open the
    # page in a new browser tab.
    external_views = [
        {"name": "Shards", "href": f"{URL_PREFIX}/shards", "destination": "nav",
         "category": "browse", "url_route": "shards"},
    ]  # fmt: skip
