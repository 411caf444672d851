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


def quiet_libraries(progress_bars: bool = True) -> None:
    """For the rest of this process: no warnings, and torch, torchao, neural-compressor, diffusers
    and transformers log errors only. ``progress_bars=False`` also hides diffusers' and
    transformers' own bars (worker processes: theirs would interleave with the driver's)."""
    import torch  # noqa: F401 - first: its import sets up torch's loggers, levels included

    warnings.filterwarnings("ignore")
    # diffusers imports torchao when it is installed (neural-compressor needs it), and torch then
    # logs pytree deprecation warnings on every command; INC logs INFO lines through its own logger.
    for name in ("torch", "torchao", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
        except ImportError:
            continue
        module.set_verbosity_error()
        if not progress_bars:
            module.disable_progress_bar()
