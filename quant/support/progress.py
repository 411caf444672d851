"""Progress bars for long stages: shown on a terminal, silent in pipes and CI logs.

Example::

    for item in progress(items, "generate onnx", "video"):
        ...
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over ``iterable``; ``disable=None`` is tqdm's "only on a TTY"."""
    return tqdm(iterable, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True)
