"""The failures a user can fix. Each message names the file, record or setting and what was expected."""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors the CLI reports as one line instead of a traceback."""


class InputError(ServingError, ValueError):
    """Bad input: wrong shape or dtype, NaN/inf, an unreadable or non-image file, an empty input, a label
    count that does not match. The message names the file or record index."""


class ModelSourceError(ServingError, ValueError):
    """The model could not be found or does not satisfy the serving contract."""


class DeviceError(ServingError, RuntimeError):
    """The requested device is not usable (e.g. `--device cuda` without a usable GPU)."""
