"""The plugins-folder route to the facecaption Airflow plugin (`facecaption_airflow.plugin`),
for a checkout whose `plugins/` is Airflow's plugins folder. Everything Airflow-facing lives in
the `facecaption_airflow` package beside this file (which `.airflowignore` keeps the plugin
loader out of).

Where facecaption is installed (the wheel, or `pip install -e`), its `airflow.plugins` entry
point registers the plugin: this file then defines nothing, so Airflow registers it once
rather than reporting the second registration as a plugin import error."""

from __future__ import annotations

from importlib.metadata import entry_points

if not entry_points(group="airflow.plugins", name="facecaption"):
    from facecaption_airflow.plugin import FacecaptionPlugin

    __all__ = ["FacecaptionPlugin"]
