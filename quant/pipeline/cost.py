"""What a variant costs, measured while it generates (no extra runs).

- ``ModuleClock``: seconds and calls per module, by wrapping each part's entry point on the
  instance (``forward``; the VAE's ``decode``, which is what the pipeline calls) for as long as
  the ``with`` block lasts: the reference pipeline's PyTorch modules are shared by every variant,
  so the wrappers are always removed again.
- ``PeakRSS``: the process's peak resident memory while a block ran. Linux resets the peak
  (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``; where that is refused the
  peak since the process started is reported, and ``reset`` says so. With CUDA in use, also
  torch's peak GPU memory (``gpu_peak_bytes``; ORT's CUDA arena is not in it).
- ``model_bytes``: what a variant's modules weigh: ONNX files (with external data) for ONNX
  modules, parameters and buffers for PyTorch ones.

On a GPU, work is asynchronous: the clock synchronizes the device before and after each call,
so a module's seconds are its own and not the next one's.

Example::

    with ModuleClock(pipe) as clock, PeakRSS() as rss:
        generate_video(pipe, prompt, seed, settings)
    clock.seconds["transformer"], rss.peak_bytes
"""

from __future__ import annotations

import time
from pathlib import Path

PARTS = {"text_encoder": ("text_encoder", "forward"), "transformer": ("transformer", "forward"),
         "transformer_2": ("transformer_2", "forward"), "vae_decoder": ("vae", "decode")}


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_initialized()  # False on a CPU build, and until something used the GPU


def _sync() -> None:
    if _cuda_in_use():
        import torch

        torch.cuda.synchronize()


class ModuleClock:
    """Per-module seconds and calls inside the ``with`` block (see the module doc)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._installed: list[tuple[object, str]] = []

    def _wrap(self, module: str, part, method: str) -> None:
        original = getattr(part, method)

        def timed(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync()
                self.seconds[module] = self.seconds.get(module, 0.0) + time.perf_counter() - start
                self.calls[module] = self.calls.get(module, 0) + 1

        setattr(part, method, timed)  # an instance attribute: shadows the class's method
        self._installed.append((part, method))

    def __enter__(self) -> "ModuleClock":
        for module, (attribute, method) in PARTS.items():
            part = getattr(self.pipe, attribute, None)
            if part is not None:
                self._wrap(module, part, method)
        return self

    def __exit__(self, *exc) -> None:
        for part, method in self._installed:
            delattr(part, method)  # the class's method shows through again
        self._installed.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of this process while the block ran, in bytes (None if unknown)."""

    def __init__(self):
        self.peak_bytes: int | None = None
        self.gpu_peak_bytes: int | None = None
        self.reset = False

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if _cuda_in_use():
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = _vm_hwm()
        if _cuda_in_use():
            import torch

            self.gpu_peak_bytes = int(torch.cuda.max_memory_allocated())


def model_bytes(pipe, onnx_bytes: dict[str, int]) -> int:
    """Bytes of the variant's modules: ``onnx_bytes`` (module -> its ONNX files' size) for ONNX
    modules, tensor bytes for PyTorch ones."""
    total = 0
    for module, (attribute, _) in PARTS.items():
        if module in onnx_bytes:
            total += onnx_bytes[module]
            continue
        part = getattr(pipe, attribute, None)
        if part is None:
            continue
        if module == "vae_decoder":  # the decoder side is what generation runs
            part = getattr(part, "decoder", part)
        total += sum(t.numel() * t.element_size() for t in list(part.parameters()) + list(part.buffers()))
    return total
