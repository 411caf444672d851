"""Silence libraries' own chatter (exporter progress, converter logs) while they run for us.

Example::

    with quiet("torch", "onnxscript"):
        torch.onnx.export(...)
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet(*logger_names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers (and the root logger) to ``level``, hide warnings and stdout."""
    loggers = [logging.getLogger(n) for n in ("", *logger_names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
