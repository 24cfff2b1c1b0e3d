"""The pipeline's names that a DAG file reads while Airflow parses it: the stages in run order
and the work-selection statuses. Plain constants, so that parsing a DAG (which every task
process does again before it runs) imports no stage, no pyarrow and no SQL; the stages
themselves are `facecaption.core.stage.stage_registry`, whose names tests hold to these."""

from __future__ import annotations

STAGE_NAMES = ("fetch", "detect", "attribute", "caption", "export")
WORK_STATUSES = ("all", "pending", "failed", "stale", "retryable", "work")
