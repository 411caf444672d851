"""Pipelines the suite loads: built-in tiny Wan2.2 pipelines and local diffusers checkpoints.

``wan2.2-t2v-tiny`` has Wan2.2-T2V-A14B's shape (two ``WanTransformer3DModel`` experts switched
at boundary ratio 0.875, a UMT5 text encoder, the Wan 2.1 VAE, a flow-matching UniPC
scheduler); ``wan2.2-ti2v-tiny`` has TI2V-5B's (one transformer, VAE 2.2 with 4x16x16
compression and ``is_residual``, ``expand_timesteps``). Both are built in code at tiny width
with seeded weights and a byte-level tokenizer, so nothing is downloaded. A folder written by
``WanPipeline.save_pretrained`` loads through ``load_model`` too.

Example::

    model = load_model("wan2.2-t2v-tiny")
    model.pipe("a red kite", num_inference_steps=8, ...)
    model.fingerprint   # "sha256:..." over every weight and config
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from quant.errors import UserError, first_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time

DEFAULT_MODEL = "wan2.2-t2v-tiny"
_TEXT_DIM = 32


@dataclass
class LoadedModel:
    """A pipeline with the facts a run records about it.

    Attributes:
        name: the built-in name, or the folder path as given.
        source: ``"builtin"`` or the resolved folder path.
        pipe: the ``diffusers.WanPipeline`` (FP32, CPU, eval mode).
        fingerprint: ``sha256:<hex>`` over configs, tokenizer and every weight.
    """

    name: str
    source: str
    pipe: object
    fingerprint: str
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def pipe_on(self, device) -> object:
        """The pipeline on ``device`` (a ``torch.device``): ``pipe`` itself on the CPU, else one
        copy moved there, made once (export, parity and INC keep using the CPU ``pipe``)."""
        if device.type == "cpu":
            return self.pipe
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = copy.deepcopy(self.pipe).to(device)
        return self._on_device[key]

    def identity(self) -> dict:
        """How run files name the model: ``name``, ``source``, ``fingerprint``."""
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint}


def build_tokenizer():
    """A byte-level tokenizer built in code (T5 conventions: pad=0, eos=1, unk=2, eos appended).

    Every UTF-8 byte has a token, so any prompt tokenizes without a learned vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with weights drawn from ``seed`` (independent of the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _text_encoder(vocab_size: int, d_model: int = _TEXT_DIM, d_ff: int = 64, layers: int = 2):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=d_ff, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )
    model = UMT5EncoderModel(config)
    # Eager attention: the SDPA path of UMT5 does not survive ONNX decomposition (a view of a
    # transposed tensor); eager is the same math.
    model.set_attn_implementation("eager")
    return model


def _transformer(channels: int, heads: int = 2, head_dim: int = 12, ffn_dim: int = 32, layers: int = 2,
                 text_dim: int = _TEXT_DIM, patch: int = 2, temporal_patch: int = 1):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(temporal_patch, patch, patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=256, ffn_dim=ffn_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
    )


# The VAE's RMS norms divide each pixel's feature vector by its length. Over one channel that is
# sign(x): a step at zero where PyTorch and ONNX Runtime (or FP32 and FP16) land on different
# sides and the decoded video jumps (seen at base_dim=3: 45 dB between two FP32 runtimes).
# Real Wan VAEs normalise >= 96 channels; the tiny ones keep >= 8 (tests/test_models.py).
MIN_NORM_CHANNELS = 8


def build_t2v_tiny():
    """Wan2.2-T2V-A14B's shape at tiny width: two experts, boundary 0.875, Wan 2.1 VAE."""
    from diffusers import AutoencoderKLWan, WanPipeline

    tokenizer = build_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(1, lambda: _text_encoder(len(tokenizer))),
        vae=_seeded(2, lambda: AutoencoderKLWan(
            base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        )),
        scheduler=_scheduler(flow_shift=3.0),
        transformer=_seeded(3, lambda: _transformer(16)),
        transformer_2=_seeded(4, lambda: _transformer(16)),
        boundary_ratio=0.875,
    )


def build_ti2v_tiny():
    """TI2V-5B's shape at tiny width: one transformer, VAE 2.2 (z 48, patch 2, residual), expand_timesteps."""
    from diffusers import AutoencoderKLWan, WanPipeline

    tokenizer = build_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(1, lambda: _text_encoder(len(tokenizer))),
        vae=_seeded(2, lambda: AutoencoderKLWan(
            base_dim=8, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        )),
        scheduler=_scheduler(flow_shift=5.0),
        transformer=_seeded(3, lambda: _transformer(48)),
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=True,
    )


# wan2.2-t2v-shapes: the T2V-A14B shape, wider than wan2.2-t2v-tiny so that it can learn its
# world, trained by `make weights` (quant/pipeline/train_shapes.py) into a diffusers checkpoint
# folder inside the package (committed: 4.5 MB of safetensors). The default audit's model.
SHAPES_MODEL = "wan2.2-t2v-shapes"
SHAPES_WEIGHTS = Path(__file__).resolve().parent / "weights" / SHAPES_MODEL
SHAPES_TEXT_DIM = 64
SHAPES_DIT_WIDTH = 64  # the experts' hidden width: heads x head_dim
SHAPES_TRAIN_SHIFT = 3.0  # the untrained pipeline's flow shift, which the experts' training sigmas keep


def head_dim_fits(head_dim: int) -> bool:
    """Whether heads of ``head_dim`` tile the shapes experts' width (``build_t2v_shapes_untrained``'s
    rule, also ``make weights``' check of ``--head-dim``)."""
    return head_dim >= 1 and SHAPES_DIT_WIDTH % head_dim == 0


def build_t2v_shapes_untrained(seed: int = 0, patch: int = 2, layers: int = 6, head_dim: int = 16,
                               temporal_patch: int = 5):
    """The architecture of ``wan2.2-t2v-shapes`` with seeded, untrained weights (training starts here).

    Two experts (boundary 0.875) of 6 blocks at width 64, a 2-layer UMT5 encoder of width 64, the
    Wan 2.1 VAE at base width 16 with three stages (4x spatial, 4x temporal compression); 64x64x17
    videos are 16x5x16x16 latents. With the usual four stages (8x8 latents) the decoder learnt
    colour but rounded shapes off (frame-0 shapes 40-73% right after 600 steps); with three, 100%
    shapes and colours after 600 steps (README, Prompt adherence).

    The experts' patches are 5x2x2 (``temporal_patch`` 5): one token holds a 2x2 latent place in all
    five latent frames, 64 tokens a clip. Wan2.2's are 1x2x2; with one token per latent frame the
    experts never learnt one object moving coherently across frames (motion 12-31% over every
    run), with a token spanning the frames they did in the first run (94%): the move is then the
    token's own output, not something attention between frames must learn at this size.

    ``patch``, ``temporal_patch``, ``layers`` and ``head_dim`` (heads of ``head_dim`` in the width
    64) are the experts' knobs ``train_shapes`` tries; a checkpoint records what it used.

    Raises:
        ValueError: ``head_dim`` does not divide the width 64.
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    if not head_dim_fits(head_dim):
        raise ValueError(f"head_dim must divide the experts' width {SHAPES_DIT_WIDTH}, got {head_dim}")
    heads = SHAPES_DIT_WIDTH // head_dim

    tokenizer = build_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(seed + 1, lambda: _text_encoder(len(tokenizer), d_model=SHAPES_TEXT_DIM, d_ff=128)),
        vae=_seeded(seed + 2, lambda: AutoencoderKLWan(
            base_dim=16, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=[0.0] * 16, latents_std=[1.0] * 16, scale_factor_spatial=4,
        )),
        scheduler=_scheduler(flow_shift=SHAPES_TRAIN_SHIFT),
        transformer=_seeded(seed + 3, lambda: _transformer(16, heads=heads, head_dim=head_dim, ffn_dim=128,
                                                           layers=layers, text_dim=SHAPES_TEXT_DIM, patch=patch,
                                                           temporal_patch=temporal_patch)),
        transformer_2=_seeded(seed + 4, lambda: _transformer(16, heads=heads, head_dim=head_dim, ffn_dim=128,
                                                             layers=layers, text_dim=SHAPES_TEXT_DIM, patch=patch,
                                                             temporal_patch=temporal_patch)),
        boundary_ratio=0.875,
    )


def load_t2v_shapes():
    """The trained ``wan2.2-t2v-shapes`` pipeline from the weights ``make weights`` wrote into the package."""
    if not (SHAPES_WEIGHTS / "model_index.json").is_file():
        raise UserError(f"{SHAPES_WEIGHTS}: the trained weights of {SHAPES_MODEL} are missing (run `make weights`)")
    return _load_folder(SHAPES_WEIGHTS)


BUILTIN_MODELS: dict[str, Callable[[], object]] = {
    "wan2.2-t2v-tiny": build_t2v_tiny,
    "wan2.2-ti2v-tiny": build_ti2v_tiny,
    SHAPES_MODEL: load_t2v_shapes,
}
_REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")


def check_checkpoint_folder(folder: Path) -> dict:
    """Validate that ``folder`` is a ``WanPipeline`` checkpoint; return its ``model_index.json``.

    Raises:
        UserError: no model_index.json, another pipeline class, or a missing component folder.
    """
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder}: not a diffusers checkpoint folder (no model_index.json)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{index_path}: unreadable model index ({exc})") from None
    if not isinstance(index, dict) or index.get("_class_name") != "WanPipeline":
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise UserError(f"{index_path}: _class_name is {found!r}, expected 'WanPipeline'")
    listed = [c for c in _REQUIRED_COMPONENTS + ("transformer_2",)
              if isinstance(index.get(c), list) and index[c] and index[c][0] is not None]
    for component in _REQUIRED_COMPONENTS:
        if component not in listed:
            raise UserError(f"{folder}: WanPipeline checkpoint is missing component '{component}' in model_index.json")
    for component in listed:
        if not (folder / component).is_dir():
            raise UserError(f"{folder}: WanPipeline checkpoint is missing component '{component}' (no folder {folder / component})")
    return index


def _load_folder(folder: Path):
    from diffusers import WanPipeline

    check_checkpoint_folder(folder)
    try:
        pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad checkpoint, reported in one line
        raise UserError(f"{folder}: cannot load WanPipeline checkpoint: {first_line(exc)}") from None
    if hasattr(pipe.text_encoder, "set_attn_implementation"):
        pipe.text_encoder.set_attn_implementation("eager")  # exportable; see _text_encoder
    _own_aligned_memory(pipe)
    return pipe


def _own_aligned_memory(pipe) -> None:
    """Copy every weight into memory of its own.

    diffusers leaves loaded weights as views into the safetensors file's memory map, at offsets
    that are not 64-byte aligned (seen: 24, 56, 28, 60), where a model built in code gets torch's
    64-byte-aligned allocations. BLAS kernels may take alignment-dependent paths (Intel MKL
    documents that results can depend on alignment), which made a saved-and-reloaded pipeline
    differ from the built-in one by one level in a few pixels on an AVX-512 machine. A copy
    gives both the same allocator, so the same weights compute the same numbers.
    """
    for name in ("text_encoder", "transformer", "transformer_2", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def use_onednn_conv3d(module: torch.nn.Module) -> None:
    """Run every ``Conv3d`` of ``module`` through oneDNN in eager CPU float32 inference.

    ATen's heuristic (``ConvParams::use_mkldnn``) sends a batch-1 input whose N*C*T*H is at most
    20480 to ``slow_conv3d`` (im2col, then GEMM): every convolution of the tiny VAE decoder (16
    channels, 64x64) and the experts' patch embedding, none of a real Wan2.2's VAE at 480p. In the
    VAE it was 69% of the PyTorch decode, 7x oneDNN's time on one such convolution
    ([1,16,3,66,66], 3x3x3: 5.4 vs 0.76 ms on 2 threads, measured). oneDNN computes the same
    convolution in another order, so the reference differs from ``slow_conv3d``'s in the last bits,
    and is as repeatable. Compiling, autograd and other devices or dtypes take ``torch.nn.Conv3d``'s
    own path; traces record plain convolutions (``tests/test_models.py``), so exports keep ``Conv``.
    """
    if not torch.backends.mkldnn.is_available():
        return
    for conv in module.modules():
        if isinstance(conv, torch.nn.Conv3d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            conv._conv_forward = _onednn_conv_forward.__get__(conv)


def _onednn_conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if (x.dim() == 5 and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(self.padding), list(self.stride),
                                                 list(self.dilation), self.groups)
    return torch.nn.Conv3d._conv_forward(self, x, weight, bias)


def use_fast_channel_norm(module: torch.nn.Module) -> None:
    """Compute the Wan VAE's RMS norms' channel lengths by a sum of squares in eager CPU float32
    inference.

    ``WanRMS_norm`` divides each pixel's feature vector by its length, ``F.normalize(x, dim=1)``:
    ATen's ``linalg_vector_norm`` over dimension 1 of a contiguous 5-D tensor takes its generic,
    unvectorised reduction: 52% of the tiny VAE's PyTorch decode under torch's profiler; with this
    the decode takes 83 instead of 156 ms (2 threads, measured on an Intel Xeon).
    ``sqrt(sum(x * x, dim=1))`` is the same length through ATen's vectorised sum, 30x faster on a
    [1,16,4,64,64] tensor (0.11 against 3.3 ms), within one float32 ulp of it; the division, the
    ``eps`` clamp and the ``scale * gamma + bias`` that follow are diffusers' own, in its order. As with
    ``use_onednn_conv3d``, the reference differs in the last bits and is as repeatable; compiling,
    autograd and other devices or dtypes take diffusers' own path, and traces record
    ``linalg_vector_norm`` (``tests/test_models.py``), so exports keep ONNX ``ReduceL2``.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    for norm in module.modules():
        if isinstance(norm, WanRMS_norm) and norm.channel_first:
            norm.forward = _fast_rms_norm_forward.__get__(norm)


def _fast_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        length = (x * x).sum(dim=1, keepdim=True).sqrt_()
        return x / length.clamp_min_(1e-12) * self.scale * self.gamma + self.bias  # F.normalize's eps
    return type(self).forward(self, x)


def load_model(name_or_path: str) -> LoadedModel:
    """Load a built-in tiny pipeline by name, or a ``WanPipeline`` checkpoint folder by path.

    Raises:
        UserError: an unknown name, or a folder that is not a loadable WanPipeline checkpoint.
    """
    if name_or_path in BUILTIN_MODELS:
        pipe, source = BUILTIN_MODELS[name_or_path](), "builtin"
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.exists():
            names = ", ".join(BUILTIN_MODELS)
            raise UserError(f"unknown model '{name_or_path}': not a built-in name ({names}) nor an existing folder")
        if not folder.is_dir():
            raise UserError(f"{folder}: a model must be a built-in name or a checkpoint folder, not a file")
        pipe, source = _load_folder(folder), str(folder.resolve())
    for module in (pipe.text_encoder, pipe.transformer, pipe.transformer_2, pipe.vae):
        if module is not None:
            module.eval().requires_grad_(False)
            use_onednn_conv3d(module)
            use_fast_channel_norm(module)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(name=name_or_path, source=source, pipe=pipe, fingerprint=fingerprint(pipe))


def _component_hash(digest, name: str, module: torch.nn.Module) -> None:
    config = getattr(module, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    digest.update(f"{name}:{_config_json(config_dict)}".encode())
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


_BOOKKEEPING = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype"})


def _config_json(config: dict) -> str:
    """Canonical JSON of a config without private keys (``_use_default_values`` is built from a
    set, so its order changes between processes) and bookkeeping that ``save_pretrained`` fills
    in (``architectures``, ``dtype``: weight dtypes are hashed with the weights)."""
    public = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _BOOKKEEPING}
    return json.dumps(public, sort_keys=True, default=str)


def _tokenizer_json(tokenizer) -> str:
    """The tokenizer's definition without its call-time state: calling it with padding/truncation
    stores those settings in the backend, which must not change the model's fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    definition = json.loads(backend.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


def fingerprint(pipe) -> str:
    """A content hash of the pipeline: component configs, tokenizer, scheduler and all weights.

    Two pipelines with the same fingerprint generate the same videos for the same settings.
    """
    digest = hashlib.sha256()
    for name in ("text_encoder", "transformer", "transformer_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            _component_hash(digest, name, module)
    digest.update(_tokenizer_json(pipe.tokenizer).encode())
    digest.update(_config_json(pipe.scheduler.config).encode())
    digest.update(_config_json(pipe.config).encode())
    return "sha256:" + digest.hexdigest()[:16]
