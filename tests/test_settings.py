"""Generation settings are validated with the rule, not silently rounded."""

from __future__ import annotations

import pytest

from quant.errors import UserError
from quant.pipeline.settings import GenerationSettings


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 40}, "height 40 must be a multiple of 16"),
    ({"width": 24}, "width 24 must be a multiple of 16"),
    ({"num_frames": 16}, "num_frames 16 must be 4\\*k\\+1"),
])
def test_sizes_the_t2v_model_cannot_take(t2v, kwargs, message):
    with pytest.raises(UserError, match=message):
        GenerationSettings(**kwargs).check_for(t2v.pipe)


def test_ti2v_needs_multiples_of_32(ti2v, t2v):
    GenerationSettings(height=48, width=48).check_for(t2v.pipe)
    with pytest.raises(UserError, match="multiple of 32.*VAE spatial factor 16 x patch 2"):
        GenerationSettings(height=48, width=48).check_for(ti2v.pipe)


@pytest.mark.parametrize("field, value", [
    ("height", 0), ("num_frames", -1), ("num_inference_steps", 2.5), ("max_sequence_length", True),
    ("guidance_scale", float("nan")), ("guidance_scale", -1.0),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        GenerationSettings(**{field: value})


def test_a_temporal_patch_needs_whole_tokens_of_latent_frames():
    """Experts that patch 5 latent frames into one token take 17 frames (5 latent frames), not 9 (3)."""
    from quant.pipeline.models import build_t2v_shapes_untrained

    pipe = build_t2v_shapes_untrained(0, patch=2, temporal_patch=5)
    GenerationSettings(num_frames=17).check_for(pipe)
    with pytest.raises(UserError, match="num_frames 9 makes 3 latent frames, which must be a multiple of the "
                                        "transformer's temporal patch 5 for this model, e.g. num_frames 17"):
        GenerationSettings(num_frames=9).check_for(pipe)
