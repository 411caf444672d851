"""The shapes world's renderer and prompt grammar, and the adherence judge on ground truth and hard cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from metrics.adherence import adherence_row, judge_video, observe, prompt_tags, summarize_adherence
from metrics.shapes_world import (BACKGROUND, COLOURS, OBJECT_FRACTION, STEPS, TRAVEL_FRACTION, ShapeSpec,
                                  all_specs, parse_prompt, render_video)
from quant.errors import UserError

SIZE, FRAMES = 64, 17


def _centroid(frame: np.ndarray) -> np.ndarray:
    mask = np.abs(frame.astype(int) - BACKGROUND).max(axis=-1) > 0
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_every_combination_has_a_prompt_that_parses_back():
    specs = all_specs()
    assert len(specs) == 96 == len(set(specs))
    for spec in specs:
        assert parse_prompt(spec.prompt()) == spec
    assert parse_prompt("A Red  circle moving LEFT.") == ShapeSpec("red", "circle", "left")
    assert parse_prompt("an orange square moving down") == ShapeSpec("orange", "square", "down")
    for other in ("a red kite flying over a windy beach", "a purple circle moving left", "a red hexagon moving up",
                  "a red circle moving sideways", "red circle moving left"):
        assert parse_prompt(other) is None


@pytest.mark.parametrize("spec", [ShapeSpec("red", "circle", "left"), ShapeSpec("white", "triangle", "up"),
                                  ShapeSpec("blue", "square", "down"), ShapeSpec("orange", "square", "right")])
def test_renderer_draws_the_world_the_issue_describes(spec):
    video = render_video(spec, FRAMES, SIZE, seed=3)
    assert video.shape == (FRAMES, SIZE, SIZE, 3) and video.dtype == np.uint8
    # a plain dark background (the corners never hold the object) and the object in its exact colour
    assert all((video[:, y, x] == BACKGROUND).all() for y in (0, -1) for x in (0, -1))
    centre = tuple(np.round(_centroid(video[FRAMES // 2])).astype(int))
    assert tuple(video[FRAMES // 2, centre[1], centre[0]]) == COLOURS[spec.colour]
    # about a quarter of the frame across, crossing about half of it along the prompt's direction
    mask = np.abs(video[0].astype(int) - BACKGROUND).max(axis=-1) > 0
    ys, xs = np.nonzero(mask)
    assert abs((xs.max() - xs.min() + 1) / SIZE - OBJECT_FRACTION) < 0.06
    moved = _centroid(video[-1]) - _centroid(video[0])
    step = STEPS[spec.direction]
    assert np.dot(moved, step) / SIZE == pytest.approx(TRAVEL_FRACTION, abs=0.03)
    assert abs(np.cross(moved, step)) < 1.0  # straight along the axis


def test_renderer_is_deterministic_per_seed_and_varies_across_seeds():
    spec = ShapeSpec("cyan", "circle", "right")
    assert np.array_equal(render_video(spec, seed=5), render_video(spec, seed=5))
    assert not np.array_equal(render_video(spec, seed=5), render_video(spec, seed=6))


def test_judge_is_right_on_every_rendered_ground_truth_video():
    wrong = []
    for seed in (0, 1):
        for i, spec in enumerate(all_specs()):
            verdict = judge_video(render_video(spec, FRAMES, SIZE, seed=1000 * seed + i), spec)
            if not verdict.ok:
                wrong.append((spec, seed, verdict))
    assert wrong == []


def _blur(video: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(gaussian_filter(video.astype(float), sigma=(0, sigma, sigma, 0)), 0, 255).round().astype(np.uint8)


def _noisy(video: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, std, video.shape)
    return np.clip(video + noise, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("spec", [ShapeSpec(c, s, d) for c, s, d in [
    ("red", "triangle", "down"), ("white", "square", "left"), ("orange", "circle", "up"), ("magenta", "triangle", "right"),
    ("cyan", "square", "up"), ("yellow", "triangle", "left")]])
def test_judge_sees_through_blur_and_noise_like_a_generated_video(spec):
    video = render_video(spec, FRAMES, SIZE, seed=11)
    assert judge_video(_blur(video, 1.0), spec).ok
    assert judge_video(_noisy(video, 10.0), spec).ok


def test_judge_tells_similar_colours_apart():
    for shown, asked in (("red", "orange"), ("orange", "yellow"), ("cyan", "green"), ("blue", "cyan"),
                         ("magenta", "red"), ("white", "yellow")):
        video = render_video(ShapeSpec(shown, "square", "left"), seed=2)
        verdict = judge_video(video, ShapeSpec(asked, "square", "left"))
        assert (verdict.colour, verdict.colour_ok, verdict.shape_ok, verdict.motion_ok) == (shown, False, True, True)


def test_judge_fails_the_wrong_shape_and_the_opposite_direction():
    video = render_video(ShapeSpec("green", "circle", "right"), seed=4)
    assert not judge_video(video, ShapeSpec("green", "square", "right")).shape_ok
    assert not judge_video(video, ShapeSpec("green", "triangle", "right")).shape_ok
    verdict = judge_video(video, ShapeSpec("green", "circle", "left"))
    assert (verdict.direction, verdict.motion_ok, verdict.colour_ok, verdict.shape_ok) == ("right", False, True, True)


def test_a_still_object_is_not_moving_and_an_empty_video_shows_nothing():
    video = render_video(ShapeSpec("blue", "square", "up"), seed=1)
    still = np.repeat(video[:1], FRAMES, axis=0)
    verdict = judge_video(still, ShapeSpec("blue", "square", "up"))
    assert (verdict.direction, verdict.motion_ok, verdict.colour_ok) == ("static", False, True)
    empty = np.full((FRAMES, SIZE, SIZE, 3), BACKGROUND, np.uint8)
    assert observe(empty)["colour"] == "none"
    assert not judge_video(empty, ShapeSpec("blue", "square", "up")).ok
    # the noise texture of an untrained model: no object, nothing adheres
    texture = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    assert not judge_video(_blur(texture, 2.0), ShapeSpec("blue", "square", "up")).ok


def test_adherence_rows_and_variant_summary_name_the_worst_prompt_and_tag():
    prompts = {"p00": "a red circle moving left", "p01": "a white square moving up", "p02": "a red kite at sunset"}
    tags = {pid: prompt_tags(text, ["white"] if pid == "p01" else []) for pid, text in prompts.items()}
    assert tags["p01"] == ["white", "square", "up"] and tags["p02"] == []
    assert adherence_row(np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8), prompts["p02"]) is None  # not judged
    good = render_video(parse_prompt(prompts["p00"]), seed=0)
    wrong = render_video(ShapeSpec("yellow", "square", "up"), seed=0)  # asked white: colour wrong
    rows = [{"variant": "v", "prompt_id": "p00", **adherence_row(good, prompts["p00"])},
            {"variant": "v", "prompt_id": "p01", **adherence_row(wrong, prompts["p01"])},
            {"variant": "w", "prompt_id": "p00", **adherence_row(good, prompts["p00"])}]
    summary = summarize_adherence(pd.DataFrame(rows), prompts, tags).set_index("variant")
    assert summary.loc["v", "adherence"] == 0.5 and summary.loc["v", "adherence_colour"] == 0.5
    assert summary.loc["v", "adherence_shape"] == 1.0
    assert summary.loc["v", "adherence_worst_prompt"] == prompts["p01"]
    assert summary.loc["v", "adherence_worst_tag"] == "square"  # one failed video: a three-way tie, A-Z first
    assert summary.loc["w", "adherence"] == 1.0 and summary.loc["w", "adherence_worst_prompt"] == ""


def test_prompt_files_carry_tags_and_calibration_must_not_rephrase_an_eval_combination(tmp_path):
    from quant.pipeline.prompts import read_prompt_entries, read_prompts
    from quant.stages.calibrate import check_disjoint

    path = tmp_path / "eval.txt"
    path.write_text("# comment\na white square moving up | white, no-hue\na red circle moving left\n", encoding="utf-8")
    assert read_prompts(path) == ["a white square moving up", "a red circle moving left"]
    assert read_prompt_entries(path) == [("a white square moving up", ["white", "no-hue"]),
                                         ("a red circle moving left", [])]
    (tmp_path / "bad.txt").write_text("| only tags\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.txt:1: a line with tags"):
        read_prompts(tmp_path / "bad.txt")
    with pytest.raises(UserError, match="same combination"):
        check_disjoint(["A white square moving up."], read_prompts(path), tmp_path / "cal.txt", path)
    check_disjoint(["a white square moving down"], read_prompts(path), tmp_path / "cal.txt", path)


def test_shipped_prompt_suites_are_disjoint_and_cover_the_world():
    from quant.pipeline.prompts import PROMPTS_DIR, read_prompts

    evaluation = [parse_prompt(p) for p in read_prompts(PROMPTS_DIR / "shapes_eval.txt")]
    calibration = [parse_prompt(p) for p in read_prompts(PROMPTS_DIR / "shapes_calibration.txt")]
    assert None not in evaluation and None not in calibration
    assert not set(evaluation) & set(calibration)
    assert {s.colour for s in evaluation} == set(COLOURS)
    assert {s.shape for s in evaluation} == {"circle", "square", "triangle"}
    assert {s.direction for s in evaluation} == {"left", "right", "up", "down"}
