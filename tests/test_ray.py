"""The audit on a real local Ray cluster (three raylets on this machine, started here): the same
numbers and video hashes as the local executor, a worker killed mid-task changes nothing, a
task that keeps failing is named, and a worker of another target is refused."""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import replace

import psutil
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import audit_outcome, audit_quality, copy_work, run_cli  # noqa: E402
from quant.errors import TaskFailed, UserError  # noqa: E402
from quant.stages.executor import RayExecutor, Task  # noqa: E402
from quant.support.target import current_target  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker raylets, one CPU each, on this machine."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def _kill_one_task(stop: threading.Event, killed: list) -> None:
    """SIGKILL the first Ray worker seen running a task (its title is ``ray::_run_remote``)."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("ray::_run_remote"):
                try:
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.info["pid"])
                except psutil.Error:
                    continue
                return
        time.sleep(0.05)


def test_ray_run_equals_local_run_even_with_a_worker_killed(cluster, tiny_audit, tmp_path):
    local_out, ray_out = tiny_audit.out, tmp_path / "ray"
    copy_work(local_out, ray_out, ("export:",), ("onnx/fp32", "calibration", "parity.json"))  # the cluster does the rest

    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_task, args=(stop, killed), daemon=True)
    killer.start()
    remote = run_cli(tiny_audit.config, ray_out, "--ray-address", cluster.address)
    try:
        _, err = remote.communicate(timeout=900)
    finally:
        stop.set()
        killer.join()
    assert remote.returncode == 0, err[-3000:]
    assert killed, "no task was running to kill"

    (a, videos_a), (b, videos_b) = audit_outcome(local_out), audit_outcome(ray_out)
    assert len(videos_a) == 4 * 2 * 2 and videos_a == videos_b  # (torch, onnx, int8-dynamic, ~avx2) x prompts x seeds
    assert audit_quality(a) == audit_quality(b) and a["verdict"] == b["verdict"]
    assert a["target"]["id"] == b["target"]["id"]
    assert b["executor"] == "ray" and b["config"]["runtime"]["executor"] == "ray"
    stages = {s["name"]: s for s in b["stages"]}
    ran = [s for n, s in stages.items() if n.startswith(("quantize:", "generate:", "score:"))]
    assert ran and all(not s["reused"] for s in ran)
    nodes = {part.split(" x")[0] for s in ran for part in s["where"].split(", ")}
    assert len(nodes) >= 2, nodes  # the tasks spread over the raylets
    assert all(s["where"] == "local" for n, s in stages.items() if n.startswith("export:"))
    report = (max(ray_out.glob("2*/report.html"))).read_text(encoding="utf-8")
    assert stages["generate:onnx"]["where"].split(" x")[0] in report


def _one_thread():
    """This machine's target as a worker of the one-CPU raylets sees it (threads = 1)."""
    return replace(current_target(), threads=1, torch_threads=1)


def test_a_cluster_without_room_for_the_threads_is_refused(connected, t2v, tmp_path):
    with pytest.raises(UserError, match="a task runs 4 threads, but no node of the Ray cluster has more than 1 CPUs"):
        RayExecutor(t2v, tmp_path, replace(_one_thread(), threads=4), 4, None, ("quant.stages.executor",))


def _fails(context, name: str):
    raise ValueError(f"cannot make video {name}")


def _node(context) -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.fixture()
def connected(cluster):
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    try:
        yield
    finally:
        ray.shutdown()


def test_a_task_that_keeps_failing_is_named(connected, t2v, tmp_path):
    executor = RayExecutor(t2v, tmp_path, _one_thread(), 1, None, ("quant.stages.executor",))
    results = []
    tasks = [Task("generate:int8:p00_s0", _fails, {"name": "p00_s0"}), Task("score:int8", _node, {})]
    with pytest.raises(TaskFailed) as failed:
        executor.run(tasks, "test", results.append, show_progress=False)
    message = str(failed.value)
    assert "generate:int8:p00_s0" in message and "cannot make video p00_s0" in message
    assert "score:int8" not in message and [r.task.name for r in results] == ["score:int8"]  # the other task landed


def test_a_worker_of_another_target_is_refused(connected, t2v, tmp_path):
    other = replace(_one_thread(), torch="0.0")  # the workers' torch is not "0.0": another target
    executor = RayExecutor(t2v, tmp_path, other, 1, None, ("quant.stages.executor",))
    with pytest.raises(TaskFailed, match="one verdict is for one execution target"):
        executor.run([Task("score:int8", _node, {})], "test", lambda r: None, show_progress=False)
