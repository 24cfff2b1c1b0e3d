"""Which failures are worth retrying.

A `PermanentError` is one the same run would meet again: a model that is not installed, a
setting that cannot work, an unusable source, a stage whose input stage is not done, a state
DB on an older schema. Its message says what to do; retrying only delays it, so orchestrators
fail at once (Airflow: no retries). Everything else that escapes a stage (the state DB
unreachable, a shard busy in another worker, a disk full) may pass and keeps its retries.

Bad input data is neither: a URL, a server reply, an image or a model reply that is at fault
becomes that row's typed status and never reaches this point.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Retrying will not help; the message names the fix."""


class SettingsError(PermanentError, ValueError):
    """The settings ask for something that cannot work."""


def is_permanent(error: BaseException) -> bool:
    """Whether `error` is one a retry would meet again (invalid settings included)."""
    from pydantic import ValidationError

    return isinstance(error, PermanentError | ValidationError)
