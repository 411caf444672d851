"""The two exceptions the command line turns into exit codes.

``UserError`` is bad input (exit 2): its message is one line that names the file, field or
value and, where possible, says what is allowed. ``CheckFailed`` is a check that ran and failed
(exit 1), such as an ONNX export whose parity is out of tolerance. Anything else is a bug
(exit 3).

Example::

    raise UserError(f"{path}: prompt file is empty (one prompt per line)")
"""


class UserError(Exception):
    """Bad input or usage; printed as one line, exit code 2."""


class CheckFailed(Exception):
    """A check ran and failed (parity, gate, regression); exit code 1."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class TaskFailed(Exception):
    """Tasks of a stage (a video, a variant's scores, a quantization) failed on every attempt;
    exit code 3, with every failed task named. ``failures``: (task, one-line reason)."""

    def __init__(self, failures):
        self.failures = list(failures)
        names = "; ".join(f"{task.name}: {reason}" for task, reason in self.failures[:5])
        more = f" (and {len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} task(s) failed after retries: {names}{more}")
