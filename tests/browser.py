"""Load a local HTML file in real headless Chromium over the DevTools protocol.

Collects console errors, uncaught exceptions and failed loads (``Log.entryAdded`` errors),
evaluates checks in the page, and saves a full-page screenshot. Used by the report and
dashboard tests; Debian's ``chromium`` is installed by ``make test`` (``system-deps``).

Example::

    page = open_page(Path("runs/r1/report.html"), screenshot=Path("runs/screenshots/report.png"))
    page.errors, page.evaluate("document.title")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import websocket

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class Page:
    """One loaded page: ``errors`` (console/exception/log errors), ``evaluate(js)``, ``close()``."""

    def __init__(self, proc: subprocess.Popen, ws: websocket.WebSocket, profile: tempfile.TemporaryDirectory):
        self.proc, self.ws, self.profile = proc, ws, profile
        self.errors: list[str] = []
        self._id = 0

    def _handle(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.settimeout(60)
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._handle(message)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        self.ws.settimeout(timeout)
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            self._handle(message)
            if message.get("method") == event:
                return
        raise TimeoutError(event)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def settle(self, seconds: float = 0.5) -> None:
        """Collect events that arrive shortly after load (late image decodes, console output)."""
        self.ws.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self._handle(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                pass

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            _stop(self.proc)
            self.profile.cleanup()


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Kill Chromium and every process it started (its own session), and wait until none is left:
    killing the browser process alone left renderers writing into the profile while it was being
    removed (``OSError: Directory not empty: 'Default'``)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while _running_in_group(proc.pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium's processes (group {proc.pid}) still running {timeout} s after SIGKILL")
        time.sleep(0.05)


def _running_in_group(group: int) -> bool:
    """Whether a live (not zombie) process is in process group ``group`` (Linux ``/proc``; a zombie
    waits for its reaper, which may not be ours, and writes nothing)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float = 30) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().splitlines()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def open_page(path: Path, width: int = 1280, height: int = 900) -> Page:
    """Start headless Chromium (no network use), open ``path`` and wait for its load event."""
    import urllib.request

    binary = chromium_path()
    if binary is None:
        raise RuntimeError("chromium not found; `make test` installs Debian's chromium package")
    profile = tempfile.TemporaryDirectory(prefix="qa-chromium-")
    # Chromium's own temporary files (its singleton socket folder, org.chromium.Chromium.*) go
    # inside the profile, so removing the profile removes them too
    scratch = Path(profile.name) / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-extensions", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={profile.name}", "--remote-debugging-port=0", f"--window-size={width},{height}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "TMPDIR": str(scratch)})
    try:
        port = _devtools_port(Path(profile.name), proc)
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        target = next(t for t in targets if t.get("type") == "page")
        ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
    except BaseException:
        _stop(proc)
        profile.cleanup()
        raise
    page = Page(proc, ws, profile)
    for domain in ("Runtime", "Log", "Page"):
        page.send(f"{domain}.enable")
    page.send("Page.navigate", url=Path(path).resolve().as_uri())
    page.wait_for("Page.loadEventFired")
    page.settle()
    return page
