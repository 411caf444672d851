"""PyTorch modules with the ONNX signatures of DESIGN.md, cut out of a ``WanPipeline``.

Each adapter calls the pipeline's own module exactly as ``WanPipeline.__call__`` does, and takes
and returns tensors under the DESIGN.md names, so the same adapter is what gets exported and
what the ONNX model is checked against.

Example::

    te = torch_module(pipe, "text_encoder")
    text_emb = te(input_ids, attention_mask)       # float32 [B, L, D]
"""

from __future__ import annotations

import torch

from quant.pipeline.modules import check_module_name, present_modules


class TextEncoderIO(torch.nn.Module):
    """``input_ids`` int64 [B,L], ``attention_mask`` int64 [B,L] -> ``text_emb`` float32 [B,L,D]."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask).last_hidden_state


class TransformerIO(torch.nn.Module):
    """``latent`` [B,C,T,H,W], ``timestep`` [B] (or [B,S] with expand_timesteps), ``text_emb`` [B,L,D]
    -> ``noise_pred`` [B,C,T,H,W]."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.transformer(
            hidden_states=latent, timestep=timestep, encoder_hidden_states=text_emb, return_dict=False
        )[0]


class VaeDecoderIO(torch.nn.Module):
    """``latent`` [B,C,T,H,W] (already de-normalised, as the pipeline passes it) -> ``video``
    float32 [B,3,F,H',W'] in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


def torch_module(pipe, name: str) -> torch.nn.Module:
    """The adapter for module ``name`` of ``pipe`` (eval mode, FP32)."""
    check_module_name(name, present_modules(pipe))
    if name == "text_encoder":
        return TextEncoderIO(pipe.text_encoder).eval()
    if name == "vae_decoder":
        return VaeDecoderIO(pipe.vae).eval()
    return TransformerIO(getattr(pipe, name)).eval()
