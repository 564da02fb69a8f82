"""The project's one logger."""

import logging
import sys

logger = logging.getLogger("qvggt_export")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was at setup (CLI runners and test
    capture replace sys.stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(verbose: bool = False) -> None:
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[qvggt] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
