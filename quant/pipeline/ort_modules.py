"""ONNX Runtime stand-ins for pipeline modules, so the diffusers sampling loop runs unchanged.

Each stand-in is a ``torch.nn.Module`` with the face ``WanPipeline`` expects of the module it
replaces (``config``, ``dtype``, ``device``, the call signature, the return type) and an
``onnxruntime.InferenceSession`` inside. A variant therefore differs from the reference only
in module numerics: same tokenizer, scheduler, noise and loop.

Stand-ins count non-finite outputs (``nonfinite_calls``) so a variant whose module overflows
is reported as failing, not crashed.

Example::

    session = open_session(Path("out/onnx/fp32/transformer.onnx"))
    pipe.transformer = OrtTransformer(session, pipe.transformer.config)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from quant.errors import UserError, first_line
from quant.support.target import ort_providers, ort_threads

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def open_session(path: Path, threads: int | None = None, optimize: bool = True,
                 cpu: bool = False) -> ort.InferenceSession:
    """An ``InferenceSession`` for ``path`` on the audit's device.

    Args:
        threads: intra-op threads (default: ``quant.support.target.ort_threads()``, the recorded count).
        optimize: ``False`` disables every graph optimization, so a QDQ graph runs as the float
            math of its QuantizeLinear/DequantizeLinear nodes instead of fused integer kernels
            (the reference of ``kernel_sqnr_db``, and how emulated graphs run): always on the CPU.
        cpu: on the CPU whatever the audit's device (parity, emulation); otherwise
            ``quant.support.target.ort_providers()`` (TensorRT/CUDA first on ``device = "cuda"``).

    Raises:
        UserError: the file is missing, truncated or not an ONNX model ORT can load.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or ort_threads()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ort_providers("cpu" if cpu or not optimize else None)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for a bad file
        raise UserError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None


def run_session(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` with inputs cast to the dtypes the graph declares."""
    cast = {}
    for spec in session.get_inputs():
        value = np.asarray(feeds[spec.name])
        cast[spec.name] = value.astype(_ORT_TO_NUMPY.get(spec.type, value.dtype), copy=False)
    return session.run(None, cast)


class OrtModule(torch.nn.Module):
    """Base of the stand-ins: one session, the replaced module's ``config``, an FP32 face on the
    device the module is moved to (``pipe.to(device)`` moves its anchor buffer; outputs follow)."""

    def __init__(self, session: ort.InferenceSession, config, path: str = ""):
        super().__init__()
        self.session = session
        self.config = config
        self.onnx_path = path
        self.calls = 0
        self.nonfinite_calls = 0
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def run(self, **feeds: torch.Tensor) -> torch.Tensor:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        out = run_session(self.session, arrays)[0]
        self.calls += 1
        if not np.isfinite(out).all():
            self.nonfinite_calls += 1
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(self._anchor.device)


class OrtTextEncoder(OrtModule):
    """Stands in for ``UMT5EncoderModel``: ``(input_ids, attention_mask) -> .last_hidden_state``."""

    def forward(self, input_ids, attention_mask=None, **_):
        from transformers.modeling_outputs import BaseModelOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return BaseModelOutput(last_hidden_state=self.run(input_ids=input_ids, attention_mask=attention_mask))


class OrtTransformer(OrtModule):
    """Stands in for ``WanTransformer3DModel`` as ``WanPipeline`` calls it."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **_):
        out = self.run(latent=hidden_states, timestep=timestep, text_emb=encoder_hidden_states)
        return (out,)

    @contextlib.contextmanager
    def cache_context(self, *_args, **_kwargs):
        yield  # the PyTorch model's feature-cache hook; ONNX graphs have no cache


class OrtVaeDecoder(OrtModule):
    """Stands in for ``AutoencoderKLWan`` where the pipeline decodes: ``decode(z) -> (video,)``."""

    def decode(self, z, return_dict=True, **_):
        from diffusers.models.autoencoders.vae import DecoderOutput

        video = self.run(latent=z)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, z):
        return self.decode(z, return_dict=False)[0]


STAND_INS = {
    "text_encoder": OrtTextEncoder,
    "transformer": OrtTransformer,
    "transformer_2": OrtTransformer,
    "vae_decoder": OrtVaeDecoder,
}
