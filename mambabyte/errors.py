"""Errors raised for bad user input.

Every error a user can cause (a bad checkpoint, a wrong-shape state file, an invalid flag, ...) is a
:class:`MambaByteError` with a one-line message. The CLIs catch it, print ``error: <message>`` and exit
with status 2; no traceback from deep inside.
"""


class MambaByteError(Exception):
    """A user-facing error with a clear, one-line message."""


class CheckpointError(MambaByteError):
    """A checkpoint could not be read, or does not match the model."""


class StateError(MambaByteError):
    """A recurrent-state file is malformed or does not fit the model."""
