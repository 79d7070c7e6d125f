"""One exception family for everything a user can get wrong.

The CLI maps every `DynifyError` to a one-paragraph message and exit code 2, so raising one of
these (never `assert`) is how library code reports bad input.
"""

from __future__ import annotations


class DynifyError(Exception):
    """A problem with the user's input that they can fix; the message says how."""


class ModelError(DynifyError):
    """A model name, factory or weights file that cannot be turned into a model."""


class TraceError(DynifyError):
    """The model could not be traced with torch.fx."""


class StrategyError(DynifyError):
    """A strategy that is unknown or does not apply to this model."""


class InputError(DynifyError):
    """An input tensor of the wrong shape or type."""


class ArtifactError(DynifyError):
    """A .dyn file that is truncated, edited or of an unknown version."""


class DataError(DynifyError):
    """A data set that cannot be read or does not fit the model."""


class ExportError(DynifyError):
    """A model that cannot be exported as asked."""
