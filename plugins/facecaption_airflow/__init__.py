"""Airflow-facing code, kept out of the `facecaption` library (which imports no Airflow):
the stage operators, the per-shard task group the DAGs share, the shard view and the plugin.
The wheel installs it as a package of its own; in a checkout, DAG files import it from the
plugins folder (on Airflow's sys.path), as Airflow projects do."""
