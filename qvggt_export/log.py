"""The project's one logger."""

import logging

logger = logging.getLogger("qvggt_export")


def setup_logging(verbose: bool = False) -> None:
    if logger.handlers:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[qvggt] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
