"""The top layer for people at a terminal: the `perfusion` command line, the demo and console logging.

    main         `perfusion train | generate | inspect | export`
    demo         `bash dev/demo.sh`: train a toy concept, generate, export, sample the export
    demo_export  the demo's export step
    logs         our messages at INFO, libraries' chatter hidden
"""
from .main import main

__all__ = ["main"]
