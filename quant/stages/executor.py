"""Where a stage's tasks run: in this process (``local``), in worker processes of this machine
(``processes``) or on a Ray cluster (``ray``).

A ``Task`` is one unit of an audit's matrix (a video: variant x prompt x seed; a variant's
scores; a (recipe, module) quantization): a module-level function called as
``fn(TaskContext(root, model), **kwargs)`` that reads ``inputs`` and writes ``outputs`` (paths
relative to ``root``, files or folders) and returns a small value. Both executors call the same
function, so they compute the same bytes:

- ``LocalExecutor`` calls it here with ``root`` = the work folder, one task after another.
- ``ProcessExecutor`` runs ``workers`` processes of this machine (forked from a fork server that
  imported the libraries once), each at the target's threads, with ``root`` = the work folder
  (one filesystem; a task's outputs are its own files).
  Small models leave a second core idle in one process (a tiny pipeline's calls scale badly
  across threads), so two one-thread workers do nearly twice the work of one two-thread
  process. Each worker checks the target and builds the model once, as a Ray worker does.
- ``RayExecutor`` assumes no shared filesystem. The driver puts every input file in Ray's object
  store once per content hash; a worker fetches each into its own blob cache (verifying the hash),
  runs the task in a private temporary ``root``, and returns the output files' bytes. The driver
  alone writes them into the workspace (atomically) before the task counts as done, so a run
  interrupted there resumes as a local one does. A worker first checks that it is the driver's
  execution target (same CPU numerics, threads, library versions and quant-audit code) and
  builds the same model (same fingerprint): one verdict for one target. A worker killed
  mid-task is retried by Ray (``max_retries``); a task that still fails, or that Ray can no
  longer place (no node left), ends the batch with ``TaskFailed`` naming every failed task.

Example::

    executor = LocalExecutor(model, work)
    executor.run([Task("score:int8", score_task, {"variant": "int8"}, inputs=("videos/torch",))],
                 "score", on_result=print)
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from quant.errors import TaskFailed, UserError, first_line
from quant.support.files import atomic_write_bytes, file_hash
from quant.support.progress import progress

RETRIES = 3  # Ray retries a task whose worker died this many times before it counts as failed
STALL_SECONDS = 120.0  # no node with a free CPU for this long while tasks wait: fail instead of hanging
LOCAL = "local"


@dataclass(frozen=True)
class TaskContext:
    """What a task function gets: the folder its inputs are in and its outputs go, and the model."""

    root: Path
    model: object  # quant.pipeline.models.LoadedModel


@dataclass(frozen=True)
class Task:
    """One unit of work (see the module doc); ``name`` is what a failure is reported by."""

    name: str
    fn: Callable
    kwargs: dict
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass
class TaskResult:
    task: Task
    value: object
    where: str  # "local", or "<node ip>/<node id[:8]>" on Ray
    seconds: float


def summarize_where(places: Iterable[str]) -> str:
    """``"local"``, or the nodes tasks ran on with their counts: ``"192.0.2.2/6ab6753f x5, ..."``."""
    counts = Counter(places)
    if set(counts) <= {LOCAL}:
        return LOCAL
    return ", ".join(f"{where} x{n}" for where, n in sorted(counts.items()))


def _files_under(root: Path, rel: str) -> list[str]:
    """``rel`` if it is a file, every file below it if a folder (temporary dot-files left out)."""
    path = root / rel
    if path.is_file():
        return [rel]
    if path.is_dir():
        return sorted(str(p.relative_to(root)) for p in path.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return []


class LocalExecutor:
    """Runs tasks in this process, in the work folder (see the module doc)."""

    name = LOCAL
    slots = 1  # tasks at once

    def __init__(self, model, work: Path):
        self.model, self.work = model, Path(work)

    def run(self, tasks: list[Task], label: str, on_result: Callable[[TaskResult], None],
            show_progress: bool = True) -> None:
        context = TaskContext(self.work, self.model)
        for task in progress(tasks, label, "task", show_progress and bool(tasks)):
            start = time.perf_counter()
            value = task.fn(context, **task.kwargs)
            on_result(TaskResult(task, value, LOCAL, time.perf_counter() - start))

    def close(self) -> None:
        pass


# --- processes of this machine -----------------------------------------------------------------

def _run_in_process(spec: "WorkerSpec", fn: Callable, kwargs: dict, root: str) -> tuple[object, float]:
    """A task in a worker process: the model built and checked once, ``fn`` run in ``root``."""
    import os

    model = _worker(spec, f"worker process {os.getpid()}")
    start = time.perf_counter()
    value = fn(TaskContext(Path(root), model), **kwargs)
    return value, time.perf_counter() - start


def _context():
    """Workers are forked from a fork server (``multiprocessing``'s forkserver), never from the
    driver: the driver's torch/ORT/numba thread pools stay its own, and a server that imported
    the libraries once (``start_fork_server``) makes each worker's start a fork, not 4 s of imports."""
    import multiprocessing

    return multiprocessing.get_context("forkserver")


def start_fork_server(modules: tuple[str, ...]) -> None:
    """Start the fork server now, importing ``modules`` (after ``quant.stages.worker_boot``) while
    this process goes on loading its model; a no-op once it runs."""
    from multiprocessing import forkserver

    _context().set_forkserver_preload(["quant.stages.worker_boot", *modules])
    forkserver.ensure_running()


def default_workers(threads: int) -> int:
    """Worker processes when ``[runtime] workers`` is unset: as many as the usable cores hold."""
    from quant.support.target import usable_cores

    return max(1, usable_cores() // threads)


def _new_pool(workers: int):
    from concurrent.futures import ProcessPoolExecutor

    start_fork_server(())  # with no preload if the audit did not start it earlier
    return ProcessPoolExecutor(workers, mp_context=_context())


class ProcessExecutor:
    """Runs tasks in ``workers`` processes of this machine (see the module doc)."""

    name = "processes"

    def __init__(self, model, work: Path, target, threads: int | None, workers: int | None, sources: tuple[str, ...]):
        from quant.stages.runner import source_hash
        from quant.support.environment import versions
        from quant.support.target import usable_cores

        self.model, self.work = model, Path(work)
        cores = usable_cores()
        self.workers = workers or default_workers(target.threads)
        self.slots = self.workers
        if self.workers * target.threads > cores:
            raise UserError(f"runtime.workers: {self.workers} workers x {target.threads} threads is more than the "
                            f"{cores} usable cores; lower [runtime] workers or threads")
        # a checkpoint folder is rebuilt from its path (one filesystem), a built-in model by name
        name = model.name if model.source == "builtin" else str(Path(model.source).resolve())
        self.spec = WorkerSpec(name, model.fingerprint, target.id, threads, versions(), source_hash(sources),
                               tuple(sources), {}, target.device)
        self._pool = None

    def _start(self):
        if self._pool is None:
            self._pool = _new_pool(self.workers)
        return self._pool

    def run(self, tasks: list[Task], label: str, on_result: Callable[[TaskResult], None],
            show_progress: bool = True) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        if not tasks:
            return
        pool = self._start()
        pending = {pool.submit(_run_in_process, self.spec, t.fn, t.kwargs, str(self.work)): t for t in tasks}
        try:
            with progress(range(len(tasks)), label, "task", show_progress) as bar:
                while pending:
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for future in done:
                        task = pending.pop(future)
                        try:
                            value, seconds = future.result()
                        except BrokenProcessPool:
                            self.close()  # the next batch starts a new pool
                            raise TaskFailed([(task, "its worker process died")]
                                             + [(t, "its worker process pool broke") for t in pending.values()]) from None
                        bar.update(1)
                        on_result(TaskResult(task, value, LOCAL, seconds))
        except KeyboardInterrupt:  # Ctrl-C: the workers stop now (a running task's files are not
            self._kill()           # collected, so nothing half-made is used), not after their tasks
            raise
        finally:
            for future in pending:  # an error or interrupt: what has not started does not start
                future.cancel()

    def _kill(self) -> None:
        if self._pool is not None:
            for process in list(getattr(self._pool, "_processes", {}).values()):  # no public way before 3.14
                process.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --- Ray ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    """What every worker must match before it runs a task (see ``_worker``)."""

    model_name: str
    fingerprint: str
    target: str
    threads: int | None
    versions: dict
    code: str  # quant.stages.runner.source_hash of the task functions' modules
    modules: tuple[str, ...]
    model_files: dict = field(default_factory=dict)  # rel -> (sha256, ObjectRef) for a checkpoint folder
    device: str = "cpu"  # [runtime] device: a "cuda" audit's workers need a GPU (and the same GPU kind)


_WORKER: dict = {}  # per worker process: spec key -> the loaded model


def _blob(sha: str, ref) -> Path:
    """The file of content ``sha`` in this machine's blob cache, fetched from the object store once."""
    import ray

    cache = Path(tempfile.gettempdir()) / "quant-audit-blobs"
    path = cache / sha
    if not path.is_file():
        data = ray.get(ref)
        if hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"blob {sha[:12]} arrived damaged")
        atomic_write_bytes(path, data)
    return path


def _place(sha: str, ref, dst: Path) -> None:
    """A copy, not a link: a task that rewrote an input in place must not change the cached blob."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_blob(sha, ref), dst)


def _worker(spec: WorkerSpec, node: str):
    """This worker's model, after checking it is the driver's target and code (once per process);
    ``node`` names the worker in the refusals."""
    from quant.stages.runner import source_hash
    from quant.support.environment import versions
    from quant.support.target import current_target, set_device, set_threads

    key = (spec.fingerprint, spec.target, spec.code)
    if key in _WORKER:
        return _WORKER[key]
    set_threads(spec.threads)
    try:
        set_device(spec.device)
    except UserError as exc:
        raise TaskRefused(f"node {node}: {exc}") from None
    target = current_target()
    if target.id != spec.target:
        raise TaskRefused(f"node {node} is target {target.id}, the audit's is {spec.target}: one verdict is for one "
                          "execution target (same CPU kind, threads and ONNX Runtime on every node)")
    mine = versions()
    differ = sorted(k for k in set(mine) | set(spec.versions) if mine.get(k) != spec.versions.get(k))
    if differ:
        raise TaskRefused(f"node {node} has other versions of {', '.join(differ)} than the driver: install the same "
                          "requirements.lock on every node")
    if source_hash(spec.modules) != spec.code:
        raise TaskRefused(f"node {node} runs other quant-audit code than the driver: install the same commit on every node")
    from quant.pipeline.models import load_model

    if spec.model_files:
        folder = Path(tempfile.gettempdir()) / "quant-audit-models" / spec.fingerprint.split(":")[-1][:16]
        for rel, (sha, ref) in spec.model_files.items():
            if not (folder / rel).is_file():
                _place(sha, ref, folder / rel)
        model = load_model(str(folder))
    else:
        model = load_model(spec.model_name)
    if model.fingerprint != spec.fingerprint:
        raise TaskRefused(f"node {node} builds model '{spec.model_name}' as {model.fingerprint}, the driver as "
                          f"{spec.fingerprint}")
    _WORKER.clear()
    _WORKER[key] = model
    return model


class TaskRefused(RuntimeError):
    """A worker that is not the driver's target (or code, or model): never retried."""


def _run_remote(spec: WorkerSpec, fn: Callable, kwargs: dict, files: dict, outputs: tuple[str, ...]) -> dict:
    """A task on a Ray worker: inputs placed in a private root, ``fn`` run, outputs read back."""
    import ray

    model = _worker(spec, ray.util.get_node_ip_address())
    root = Path(tempfile.mkdtemp(prefix="quant-audit-task-"))
    try:
        for rel, (sha, ref) in files.items():
            _place(sha, ref, root / rel)
        start = time.perf_counter()
        value = fn(TaskContext(root, model), **kwargs)
        seconds = time.perf_counter() - start
        produced = {rel: (root / rel).read_bytes() for out in outputs for rel in _files_under(root, out)}
        where = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
        return {"value": value, "files": produced, "where": where, "seconds": seconds}
    finally:
        shutil.rmtree(root, ignore_errors=True)


class RayExecutor:
    """Runs tasks on a Ray cluster (see the module doc). ``address``: ``auto``, ``ray://host:port``,
    a ``host:port`` of a running cluster, or None to start a local one."""

    name = "ray"

    def __init__(self, model, work: Path, target, threads: int | None, address: str | None, sources: tuple[str, ...]):
        try:
            import ray
        except ImportError:
            raise UserError("runtime.executor = \"ray\" needs the ray package (pip install 'ray==2.60.0')") from None
        from quant.stages.runner import source_hash
        from quant.support.environment import versions

        self.ray, self.model, self.work = ray, model, Path(work)
        if not ray.is_initialized():
            check_reachable(address)
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False, configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = address or "a new local cluster"
                raise UserError(f"runtime.ray_address: cannot connect to Ray at {where}: {first_line(exc)}") from None
            self._owns = True
        else:
            self._owns = False
        self._refs: dict[str, object] = {}  # sha256 -> ObjectRef: each content put once
        # a task uses the target's threads, so it reserves as many CPUs (and must fit on some node)
        alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cpus = max((r.get("CPU", 0) for r in alive), default=0)
        self.slots = max(1, sum(int(r.get("CPU", 0) // target.threads) for r in alive))  # tasks at once, cluster-wide
        if cpus < target.threads:
            raise UserError(f"runtime.threads: a task runs {target.threads} threads, but no node of the Ray cluster has more "
                            f"than {cpus:g} CPUs; set [runtime] threads to at most {int(cpus)} or add larger nodes")
        gpus = 1 if target.device == "cuda" else 0  # a "cuda" audit's tasks each hold one GPU of a node
        if gpus and not any(r.get("GPU", 0) >= 1 and r.get("CPU", 0) >= target.threads for r in alive):
            raise UserError("runtime.device = \"cuda\": no node of the Ray cluster has a GPU and "
                            f"{target.threads} CPUs; start GPU nodes or use device = \"cpu\"")
        self._remote = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=target.threads,
                                  num_gpus=gpus)(_run_remote)
        model_files = {}
        if model.source != "builtin":
            folder = Path(model.source)
            model_files = {rel: self._put(folder / rel) for rel in _files_under(folder, ".")}
        self.spec = WorkerSpec(model.name, model.fingerprint, target.id, threads, versions(), source_hash(sources),
                               tuple(sources), model_files, target.device)

    def _put(self, path: Path) -> tuple[str, object]:
        sha = file_hash(path)
        if sha not in self._refs:
            self._refs[sha] = self.ray.put(Path(path).read_bytes())
        return sha, self._refs[sha]

    def _submit(self, task: Task):
        files = {rel: self._put(self.work / rel) for want in task.inputs for rel in _files_under(self.work, want)}
        return self._remote.remote(self.spec, task.fn, task.kwargs, files, task.outputs)

    def _cpus_free(self) -> bool:
        return any(n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0 for n in self.ray.nodes())

    def run(self, tasks: list[Task], label: str, on_result: Callable[[TaskResult], None],
            show_progress: bool = True) -> None:
        from ray.exceptions import RayError

        pending = {self._submit(t): t for t in tasks}
        failed: list[tuple[Task, str]] = []
        stalled_since = None
        with progress(range(len(tasks)), label, "task", show_progress and bool(tasks)) as bar:
            while pending:
                done, _ = self.ray.wait(list(pending), num_returns=1, timeout=10.0)
                if not done:
                    if self._cpus_free():
                        stalled_since = None
                    elif stalled_since is None:
                        stalled_since = time.monotonic()
                    elif time.monotonic() - stalled_since > STALL_SECONDS:
                        failed += [(t, f"no Ray node with a CPU for {STALL_SECONDS:.0f} s") for t in pending.values()]
                        for ref in pending:
                            self.ray.cancel(ref, force=True)
                        break
                    continue
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        out = self.ray.get(ref)
                    except RayError as exc:
                        failed.append((task, _ray_reason(exc)))
                        continue
                    for rel, data in out["files"].items():
                        atomic_write_bytes(self.work / rel, data)
                    bar.update(1)
                    on_result(TaskResult(task, out["value"], out["where"], out["seconds"]))
        if failed:
            raise TaskFailed(failed)

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A ``host:port`` or ``ray://host:port`` that nothing listens on is refused at once (Ray itself
    waits minutes for it).

    Raises:
        UserError: naming the address.
    """
    import socket

    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"runtime.ray_address: expected auto, ray://HOST:PORT or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"runtime.ray_address: no Ray cluster answers at {address} ({exc.strerror or exc})") from None


def _ray_reason(exc: Exception) -> str:
    """One line: the task's own error (a worker that refused, a bug) or how its worker died."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {first_line(cause)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def make_executor(kind: str, model, work: Path, target, threads: int | None, address: str | None,
                  sources: tuple[str, ...], workers: int | None = None):
    """The executor ``[runtime] executor`` names."""
    if kind == "ray":
        return RayExecutor(model, work, target, threads, address, sources)
    if kind == "processes":
        return ProcessExecutor(model, work, target, threads, workers, sources)
    return LocalExecutor(model, work)
