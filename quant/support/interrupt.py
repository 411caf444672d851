"""An interrupt that cannot be lost: Ctrl-C and SIGTERM end a run even when their first
``KeyboardInterrupt`` is swallowed.

Python runs a signal handler between two bytecodes of the main thread, wherever it is: when
that is inside a finalizer (``__del__``, a ``weakref.finalize`` callback, a generator being
closed), the ``KeyboardInterrupt`` the handler raises is printed as "Exception ignored in ..." and
dropped, and the run goes on to the end with exit 0, as if no one had asked it to stop. So the
command line's handler (``quant.cli``) also records the request here, and the stage runner calls
:func:`check` before each stage or batch of stages starts and after each task's result is kept: a
swallowed interrupt still stops the run at the next of them, with every finished stage kept.
"""

from __future__ import annotations

_requested = False


def request() -> None:
    """Record that the user (or CI) asked the run to stop."""
    global _requested
    _requested = True


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested (see the module doc)."""
    if _requested:
        raise KeyboardInterrupt


def clear() -> None:
    """Forget a request (a command that handled its interrupt, or a test)."""
    global _requested
    _requested = False
