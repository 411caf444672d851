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
- ``set_device``: ``[runtime] device``. ``"cuda"`` runs the PyTorch side (reference videos,
  calibration capture, PyTorch modules of variants) on the first GPU with deterministic kernels
  and without TF32, and ONNX variants on ONNX Runtime's TensorRT/CUDA providers where the
  installed onnxruntime has them (``onnxruntime-gpu``); the target then records the GPU, its
  driver and the CUDA/cuDNN versions, and its id says ``cuda``. Export, parity, INC's PT2E
  quantization and emulation stay on the CPU (an exported graph is device-free; INC's x86
  quantizer and the emulated int8 paths are CPU by definition).

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
_device: str = "cpu"
DEVICES = ("cpu", "cuda")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # preferred first


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

    # numba first: starting its OpenMP thread pool after torch's can put torch back to all cores
    # (measured: torch.get_num_threads() 1 -> 2 once a pipeline had run)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(count)
    _threads = count
    return count


def ort_threads() -> int:
    """The intra-op thread count ONNX Runtime sessions use (``set_threads``; default all cores)."""
    return _threads if _threads is not None else usable_cores()


def set_device(device: str, where: str = "runtime.device") -> str:
    """Run this process's PyTorch side (and ONNX Runtime, where it can) on ``device``.

    ``"cuda"`` also makes the GPU's numbers repeatable: deterministic cuDNN/cuBLAS algorithms
    (``CUBLAS_WORKSPACE_CONFIG``), no cuDNN autotuning, no TF32 (an FP32 reference must be FP32).

    Raises:
        UserError: an unknown device, or ``"cuda"`` without a CUDA device visible to torch.
    """
    global _device
    if device not in DEVICES:
        raise UserError(f"{where}: expected one of {', '.join(DEVICES)}, got {device!r}")
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UserError(f"{where} = \"cuda\": no CUDA device is visible to torch {torch.__version__} ({build}); "
                            "use device = \"cpu\"")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns, never crashes an audit
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from metrics import fused

    fused.set_device(device)  # SSIM and PSNR through PyTorch on the GPU too (metrics.torch_kernels)
    _device = device
    return device


def torch_device():
    """The ``torch.device`` the PyTorch side runs on."""
    import torch

    return torch.device("cuda", 0) if _device == "cuda" else torch.device("cpu")


def ort_providers(device: str | None = None, available: list[str] | None = None) -> list[str]:
    """ONNX Runtime providers for sessions on ``device`` (default: ``set_device``'s), best first:
    TensorRT and CUDA where the installed onnxruntime offers them (``onnxruntime-gpu``), then the
    CPU, which runs whatever a GPU provider does not take. On ``"cpu"``: the CPU only."""
    if (device or _device) != "cuda":
        return ["CPUExecutionProvider"]
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


def _nvidia_driver() -> str:
    """The NVIDIA driver release (``nvidia-smi``), or its CUDA API version from libcuda, or ``unknown``."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            if out.strip():
                return out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-api-{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"


@lru_cache(maxsize=None)
def gpu_info() -> dict:
    """The first CUDA device as ``torch`` sees it: name, compute capability, memory, driver, and
    the CUDA and cuDNN versions torch was built with. Empty without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "driver": _nvidia_driver(), "cuda": torch.version.cuda, "cudnn": cudnn}


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
        if self.device == "cuda":  # the GPU decides the numbers; the CPU still runs what providers leave
            gpu = "sm" + str(self.gpu.get("capability", "")).replace(".", "")
            return f"{self.arch}-cuda-{gpu}-{simd}-{int8}-ort{self.onnxruntime}-t{self.threads}-{digest}"
        return f"{self.arch}-{simd}-{int8}-ort{self.onnxruntime}-t{self.threads}-{digest}"

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self), "providers": list(self.providers)}

    def describe(self) -> str:
        """One line for consoles and reports."""
        gpu = ""
        if self.device == "cuda":
            gpu = (f"{self.gpu.get('name', 'GPU')} (driver {self.gpu.get('driver')}, CUDA {self.gpu.get('cuda')}, "
                   f"cuDNN {self.gpu.get('cudnn')}) with ")
        return (f"{gpu}{self.cpu} ({self.cores} cores; int8 path {self.int8_path}: "
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
                  onnxruntime=ort.__version__, providers=tuple(ort_providers()), threads=ort_threads(),
                  torch=torch.__version__.split("+")[0], torch_threads=torch.get_num_threads(), device=_device,
                  gpu=gpu_info() if _device == "cuda" else {})


def check_emulation_target(name: str, where: str = "runtime.emulate") -> str:
    """Validate an emulation target name (``avx2``, ``vnni``).

    Raises:
        UserError: an unknown name.
    """
    if name not in INT8_PATHS:
        raise UserError(f"{where}: unknown target '{name}' (targets: {', '.join(INT8_PATHS)})")
    return name
