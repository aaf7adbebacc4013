"""Console logging for the CLI and the demo: our messages at INFO, libraries' chatter hidden."""
from __future__ import annotations

import logging
import os


def setup_cli_logging() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("perfusion_ext", "perfusion_export", "perfusion"):
        logging.getLogger(name).setLevel(logging.INFO)
    # torch's ONNX exporter warns about every optional torchvision op it cannot register.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
