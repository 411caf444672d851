"""Versions and machine facts every run records, so a number can be traced to what made it.

Example::

    versions()["onnxruntime"]   # "1.31.1"
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

_PACKAGES = ("quant-audit", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript",
             "onnxslim", "numpy", "scikit-image", "opencv-python-headless",
             "neural-compressor-pt", "torchao")


def utc_now() -> str:
    """The time now as ISO 8601 in UTC (``2026-11-21T15:30:17Z``): strings that sort as times do,
    whatever the time zone of the machine that wrote them."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict[str, str]:
    """Installed versions of the packages whose code produces our numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
