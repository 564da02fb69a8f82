"""The project's one logger."""

import logging
import os
import sys
import warnings

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


# Third-party chatter that says nothing about the user's run ("torchvision is not installed. Skipping
# torchvision::nms" from torch.onnx, deprecation warnings raised inside torch / onnxscript): --verbose only.
QUIET_LOGGERS = ("onnxscript", "onnx_ir")
QUIET_WARNING_MODULES = r"(torch|onnxscript|onnx_ir|onnx|onnx_graphsurgeon|polygraphy|copyreg)(\.|$)"


def _quiet_third_party() -> None:
    if "torch" in sys.modules:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    else:  # importing torch resets its loggers' levels; TORCH_LOGS is what it reads then ("-onnx": errors only)
        os.environ.setdefault("TORCH_LOGS", "-onnx")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_WARNING_MODULES)


def setup_logging(verbose: bool = False) -> None:
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        _quiet_third_party()
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[qvggt] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
