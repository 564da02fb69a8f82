"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QVGGTError(Exception):
    """Bad input or an unmet precondition, reported to the user without a traceback."""


class CheckpointError(QVGGTError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class InputError(QVGGTError):
    """Images, datasets or other inputs are missing or malformed."""


class ResourceError(QVGGTError):
    """The machine ran out of something the run needs (disk space, memory), or an input would need more
    than it may take (an image above the pixel limit, more views than the memory holds)."""


class BusyError(QVGGTError):
    """Another process holds the output (a second build into the same folder)."""
