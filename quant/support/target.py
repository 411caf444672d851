"""The execution target: the machine facts that change an audit's numbers, recorded and keyed.

Integer kernels give different numbers on different x86 CPUs. ONNX Runtime's u8 x s8 kernels
(MLAS; s8 activations are flipped to u8 by adding 128) multiply byte pairs with VPMADDUBSW on
CPUs without VNNI: two adjacent products are summed into a *saturating* int16 before the int32
accumulation, so a pair whose sum leaves [-32768, 32767] is clipped. VNNI (VPDPBUSD, AVX-512
or AVX-VNNI) and AMX accumulate four products straight into int32, exactly. Float kernels also
differ between AVX2 and AVX-512 (blocking, FMA order). So a verdict belongs to one target:

- ``Target``: CPU model, the numerics-relevant ISA flags, cores, the int8 path those flags
  select (``vnni`` exact, ``avx2`` saturating pairs), ONNX Runtime version and providers,
  intra-op threads, torch threads, and a short stable ``id`` built from what changes numbers
  (not from the CPU's marketing name: two CPUs with the same flags and software share an id).
- ``set_threads``: fixes ONNX Runtime's and torch's intra-op threads for the process
  (``[runtime] threads``; default all usable cores), so the recorded count is the one used.

Example::

    set_threads(2)
    target = current_target()
    target.id                 # "x86_64-avx2-novnni-ort1.31.1-t2-5c1f0e"
    target.int8_path          # "avx2": u8s8 pairs saturate to int16 here
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from quant.errors import UserError

NUMERIC_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "fma")
# int8 paths an audit can emulate (``<variant>~<target>``): how u8 x s8 pair sums accumulate.
INT8_PATHS = {
    "avx2": "x86 without VNNI: adjacent u8 x s8 products summed with saturation to int16 (VPMADDUBSW)",
    "vnni": "x86 with VNNI or AMX: products accumulated in int32, exactly (VPDPBUSD)",
}

_threads: int | None = None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Fix intra-op threads for ONNX Runtime sessions, torch and the metric kernels (numba) in this
    process; returns the count. Metric values do not depend on it (``metrics.fused``).

    Raises:
        UserError: a count below 1.
    """
    global _threads
    count = usable_cores() if threads is None else threads
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"runtime.threads must be a positive integer, got {threads!r}")
    import torch

    import numba

    torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    _threads = count
    return count


def ort_threads() -> int:
    """The intra-op thread count ONNX Runtime sessions use (``set_threads``; default all cores)."""
    return _threads if _threads is not None else usable_cores()


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, flags) from /proc/cpuinfo; py-cpuinfo elsewhere."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        text = ""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if not flags:
        try:
            import cpuinfo

            info = cpuinfo.get_cpu_info()
            model, flags = info.get("brand_raw", model), set(info.get("flags", []))
        except Exception:  # noqa: BLE001 - an unknown platform: record what we know
            pass
    return model or platform.processor() or "unknown", flags


def int8_path(flags: dict[str, bool]) -> str:
    """Which integer path ONNX Runtime's x86 u8s8 kernels take on a CPU with ``flags``."""
    if flags.get("avx512_vnni") or flags.get("avx_vnni") or flags.get("amx_int8"):
        return "vnni"
    if flags.get("avx2") or flags.get("avx512bw"):
        return "avx2"
    return "other"


@dataclass(frozen=True)
class Target:
    """Where an audit's numbers were computed (``results.json`` ``target``)."""

    arch: str
    cpu: str
    flags: dict[str, bool]
    cores: int
    int8_path: str
    onnxruntime: str
    providers: tuple[str, ...]
    threads: int
    torch: str
    torch_threads: int
    device: str = "cpu"
    gpu: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Readable and stable: arch, float SIMD width, VNNI or not, ORT version, threads, and a
        hash of everything that changes numbers (flags, providers, versions, device)."""
        numerics = {k: v for k, v in asdict(self).items() if k not in ("cpu", "cores")}
        digest = hashlib.sha256(json.dumps(numerics, sort_keys=True).encode()).hexdigest()[:6]
        simd = "avx512" if self.flags.get("avx512f") else "avx2" if self.flags.get("avx2") else "base"
        int8 = {"vnni": "vnni", "avx2": "novnni"}.get(self.int8_path, self.int8_path)
        return f"{self.arch}-{simd}-{int8}-ort{self.onnxruntime}-t{self.threads}-{digest}"

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self), "providers": list(self.providers)}

    def describe(self) -> str:
        """One line for consoles and reports."""
        return (f"{self.cpu} ({self.cores} cores; int8 path {self.int8_path}: "
                f"{INT8_PATHS.get(self.int8_path, 'no x86 SIMD int8 kernels')}); ONNX Runtime {self.onnxruntime} "
                f"{'/'.join(self.providers)}, {self.threads} threads; target {self.id}")


@lru_cache(maxsize=None)
def _machine() -> tuple[str, str, tuple[tuple[str, bool], ...]]:
    model, flags = _cpuinfo()
    return platform.machine(), model, tuple((f, f in flags) for f in NUMERIC_FLAGS)


def current_target() -> Target:
    """The target this process runs on now (threads as set by ``set_threads``)."""
    import onnxruntime as ort
    import torch

    arch, model, flags = _machine()
    flags = dict(flags)
    return Target(arch=arch, cpu=model, flags=flags, cores=usable_cores(), int8_path=int8_path(flags),
                  onnxruntime=ort.__version__, providers=("CPUExecutionProvider",), threads=ort_threads(),
                  torch=torch.__version__.split("+")[0], torch_threads=torch.get_num_threads())


def check_emulation_target(name: str, where: str = "runtime.emulate") -> str:
    """Validate an emulation target name (``avx2``, ``vnni``).

    Raises:
        UserError: an unknown name.
    """
    if name not in INT8_PATHS:
        raise UserError(f"{where}: unknown target '{name}' (targets: {', '.join(INT8_PATHS)})")
    return name
