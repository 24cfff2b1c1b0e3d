"""Airflow-facing code, kept out of the `facecaption` library (which imports no Airflow):
the stage operators, the per-shard task group the DAGs share, and the shard view. DAG files
import it from the plugins folder (on Airflow's sys.path), as Airflow projects do."""
