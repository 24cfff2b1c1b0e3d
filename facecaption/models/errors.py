"""What goes wrong with models: the one error every backend raises for a model that is not
where the settings say, with the command that gets it in its message."""

from __future__ import annotations

from facecaption.core.errors import PermanentError


class ModelNotFoundError(PermanentError, FileNotFoundError):
    """A model the settings ask for is not in the model cache or at the given path."""
