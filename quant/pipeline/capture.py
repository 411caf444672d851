"""Record each module's real inputs while the PyTorch pipeline generates.

Parity checks and calibration need the tensors a module sees in a real generation, at every
denoising step, not random ones. ``record_inputs`` hooks the pipeline's modules for the length
of a ``with`` block and hands every call's inputs, under the ONNX input names of DESIGN.md, to a
sink. The sink decides what to keep, so a caller can stream samples to disk instead of RAM.

Example::

    samples = SampleList(per_module=4)
    with record_inputs(pipe, samples):
        pipe("a red kite", ...)
    samples["transformer"][0].inputs["latent"].shape   # (1, 16, 5, 8, 8)
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch


@dataclass
class Sample:
    """One call of one module.

    Attributes:
        module: module name (DESIGN.md).
        inputs: ONNX input name -> array, exactly what the module received.
        call: index of this call among the module's calls in the recording.
        step: denoising step index (transformers), None otherwise.
        timestep: scheduler timestep of that step, None outside the denoising loop.
    """

    module: str
    inputs: dict[str, np.ndarray]
    call: int
    step: int | None = None
    timestep: float | None = None


Sink = Callable[[Sample], None]


@dataclass
class SampleList:
    """A sink that keeps the first ``per_module`` samples of each module in memory."""

    per_module: int = 4
    samples: dict[str, list[Sample]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, sample: Sample) -> None:
        kept = self.samples[sample.module]
        if len(kept) < self.per_module:
            kept.append(sample)

    def __getitem__(self, module: str) -> list[Sample]:
        return self.samples[module]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy().copy()


class _Recorder:
    def __init__(self, pipe, sink: Sink):
        self.pipe, self.sink = pipe, sink
        self.calls: dict[str, int] = defaultdict(int)

    def emit(self, module: str, inputs: dict[str, np.ndarray]) -> None:
        t = getattr(self.pipe, "_current_timestep", None)
        step = None
        if module.startswith("transformer") and t is not None:
            timesteps = self.pipe.scheduler.timesteps
            step = int((timesteps == t).nonzero()[0, 0]) if (timesteps == t).any() else None
        self.sink(Sample(module, inputs, self.calls[module], step, None if t is None else float(t)))
        self.calls[module] += 1

    def text_encoder_hook(self, _mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.emit("text_encoder", {"input_ids": _np(ids), "attention_mask": _np(mask)})

    def transformer_hook(self, name: str):
        def hook(_mod, args, kwargs):
            latent = kwargs.get("hidden_states", args[0] if args else None)
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            self.emit(name, {"latent": _np(latent), "timestep": _np(timestep), "text_emb": _np(text)})
        return hook


@contextmanager
def record_inputs(pipe, sink: Sink) -> Iterator[None]:
    """Hook ``pipe``'s PyTorch modules and send each call's inputs to ``sink`` until exit.

    Modules already replaced by ONNX stand-ins are not recorded. The VAE is recorded at
    ``vae.decode`` (the module boundary DESIGN.md names), by wrapping that method.
    """
    rec = _Recorder(pipe, sink)
    with ExitStack() as stack:
        if isinstance(pipe.text_encoder, torch.nn.Module) and hasattr(pipe.text_encoder, "encoder"):
            handle = pipe.text_encoder.register_forward_pre_hook(rec.text_encoder_hook, with_kwargs=True)
            stack.callback(handle.remove)
        for name in ("transformer", "transformer_2"):
            module = getattr(pipe, name, None)
            if module is not None and hasattr(module, "blocks"):
                handle = module.register_forward_pre_hook(rec.transformer_hook(name), with_kwargs=True)
                stack.callback(handle.remove)
        vae = pipe.vae
        if hasattr(vae, "decoder"):
            original = vae.decode

            def decode(z, *args, **kwargs):
                rec.emit("vae_decoder", {"latent": _np(z)})
                return original(z, *args, **kwargs)

            vae.decode = decode
            stack.callback(lambda: vars(vae).pop("decode", None))
        yield
