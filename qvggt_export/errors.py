"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QVGGTError(Exception):
    """Bad input or an unmet precondition, reported to the user without a traceback."""


class CheckpointError(QVGGTError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class InputError(QVGGTError):
    """Images, datasets or other inputs are missing or malformed."""
