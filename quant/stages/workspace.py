"""The workspace: every path under an audit's ``--out``, and the only code that deletes there.

``<out>/`` holds run folders (``<run_id>/``), ``history.sqlite``, ``dashboard.html`` and
``work/<fingerprint>/`` (models, calibration, videos, scores, search, sensitivity) shared by the
runs of one model. User-given names that become paths (variants, mixes, search names) are
validated before they reach a path (``quant.recipes.names.check_name``: no ``/``, ``..``,
leading dot, control characters or empty name), and ``remove`` refuses anything that is not
strictly inside one of the work folder's own subfolders: a name can never reach a run folder,
the history or anything outside ``--out``.

Example::

    ws = Workspace(Path("runs"))
    work = ws.work("sha256:a7ee8...")
    ws.videos(work, "int8")            # runs/work/a7ee8.../videos/int8
    ws.remove(ws.videos(work, "int8"))  # allowed; ws.remove(ws.out) raises
"""

from __future__ import annotations

import shutil
from pathlib import Path

from quant.recipes.names import check_name
from reports.history import location
DASHBOARD = "dashboard.html"
RUN_FILE = "run.json"
# the work folder's own subfolders: the only places anything is ever deleted
OWNED = ("onnx", "calibration", "videos", "scores", "quantization", "search", "sensitivity")


class Workspace:
    """Paths under ``out`` (see the module doc)."""

    def __init__(self, out: Path, history_url: str | None = None):
        self.out = Path(out)
        self.history_url = history_url

    @property
    def history(self):
        """The history store: ``[history] url``, else ``$QUANT_AUDIT_HISTORY_URL``, else
        ``<out>/history.sqlite`` (a Path); ``reports.history`` takes either."""
        return location(self.out, self.history_url)

    @property
    def dashboard(self) -> Path:
        return self.out / DASHBOARD

    def work(self, fingerprint: str) -> Path:
        """Where the runs of one model share their models, calibration, videos and scores."""
        return self.out / "work" / fingerprint.split(":")[-1][:16]

    def run_dir(self, run_id: str) -> Path:
        return self.out / check_name(run_id, "run")

    def run_files(self):
        """Every ``<out>/<run_id>/run.json`` (run folders, finished or not)."""
        return self.out.glob(f"*/{RUN_FILE}")

    @staticmethod
    def videos(root: Path, variant: str) -> Path:
        return Path(root) / "videos" / check_name(variant)

    @staticmethod
    def scores(root: Path, variant: str) -> Path:
        return Path(root) / "scores" / check_name(variant) / "frames.csv"

    @staticmethod
    def search(root: Path) -> Path:
        """``<root>/search``: the search's record, candidates and the pinned mix."""
        return Path(root) / "search"

    @staticmethod
    def sensitivity(root: Path) -> Path:
        """``<root>/sensitivity``: per-layer rankings (CSV, JSON, SVG)."""
        return Path(root) / "sensitivity"

    @staticmethod
    def remove(path: Path) -> None:
        """Delete ``path`` (a file or a folder) if it is one of a work folder's own subfolders
        (``OWNED``: ``<root>/calibration``...) or a direct child of one (``<root>/videos/<variant>``).

        Raises:
            ValueError: anything else (an internal error: no user input may ever reach here).
        """
        path = Path(path)
        resolved = path.resolve()
        parent = resolved.parent
        owned = parent.name in OWNED or resolved.name in OWNED
        if not owned or path.is_symlink() or ".." in path.parts:
            raise ValueError(f"refusing to delete {path}: not one of a work folder's own subfolders {OWNED} "
                             "or a direct child of one")
        if resolved.is_dir():
            shutil.rmtree(resolved)
        elif resolved.exists():
            resolved.unlink()
