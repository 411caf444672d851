"""Generation settings: the sampling parameters every variant shares, validated once.

The defaults keep a CPU run of a tiny pipeline to seconds. ``check_for(pipe)`` applies the
rules of a particular pipeline (VAE compression and transformer patching), so a size the
model cannot take is refused with the rule instead of being silently rounded as diffusers does.

Example::

    settings = GenerationSettings(height=64, width=64, num_frames=17)
    settings.check_for(pipe)   # raises UserError("height 72 must be a multiple of 16 ...")
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from quant.errors import UserError


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling parameters of one audit.

    Attributes:
        height, width: output frame size in pixels.
        num_frames: frames per video; ``num_frames - 1`` must divide by the VAE's temporal factor.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale (> 1 runs the unconditional branch too); 3
            is what ``wan2.2-t2v-shapes`` does best with (README, "Prompt adherence").
        max_sequence_length: text tokens per prompt (padded/truncated).
        negative_prompt: the unconditional prompt.
    """

    height: int = 64
    width: int = 64
    num_frames: int = 17
    num_inference_steps: int = 8
    guidance_scale: float = 3.0
    max_sequence_length: int = 32
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_frames", "num_inference_steps", "max_sequence_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"generation setting '{name}' must be a positive integer, got {value!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise UserError(f"generation setting 'guidance_scale' must be a finite number >= 0, got {g!r}")
        if not isinstance(self.negative_prompt, str):
            raise UserError(f"generation setting 'negative_prompt' must be text, got {self.negative_prompt!r}")

    def check_for(self, pipe) -> None:
        """Raise UserError when this pipeline cannot take these sizes.

        Rules (as ``WanPipeline`` applies them): height and width are multiples of the VAE's
        spatial factor times the transformer's spatial patch, and of 16; ``num_frames - 1`` is a
        multiple of the VAE's temporal factor, and the latent frames it makes a multiple of the
        transformer's temporal patch.
        """
        denoiser = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        patch = tuple(denoiser.config.patch_size)
        spatial = pipe.vae_scale_factor_spatial
        multiple = math.lcm(16, spatial * patch[1], spatial * patch[2])
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % multiple:
                raise UserError(
                    f"{name} {value} must be a multiple of {multiple} for this model "
                    f"(VAE spatial factor {spatial} x patch {patch[1]}, and 16)"
                )
        temporal = pipe.vae_scale_factor_temporal
        if (self.num_frames - 1) % temporal:
            raise UserError(
                f"num_frames {self.num_frames} must be {temporal}*k+1 for this model "
                f"(VAE temporal factor {temporal}), e.g. {temporal * ((self.num_frames - 1) // temporal) + 1} "
                f"or {temporal * ((self.num_frames - 1) // temporal + 1) + 1}"
            )
        latent_frames = (self.num_frames - 1) // temporal + 1
        if latent_frames % patch[0]:
            k = temporal * patch[0]
            raise UserError(
                f"num_frames {self.num_frames} makes {latent_frames} latent frames, which must be a multiple of "
                f"the transformer's temporal patch {patch[0]} for this model, e.g. num_frames "
                f"{k * max(1, latent_frames // patch[0]) - temporal + 1}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Exported graphs have static shapes in these settings (latent T/H/W, text length).
SHAPE_SETTINGS = ("height", "width", "num_frames", "max_sequence_length")


def shape_key(settings: GenerationSettings | dict) -> dict:
    """The settings an exported graph's static shapes depend on."""
    get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k)
    return {k: get(k) for k in SHAPE_SETTINGS}
