"""Prompt files and seed lists: one prompt per line; blank lines and ``#`` comments are skipped.

A line may end with ``| tag, tag``: tags that name what the prompt tests (``white``,
``similar-colours``), reported with the prompts a variant gets wrong. The text before ``|`` is
the prompt.

Example::

    prompts = read_prompts(DEFAULT_EVAL_PROMPTS)
    entries = read_prompt_entries(DEFAULT_EVAL_PROMPTS)   # [("a white ...", ["white"]), ...]
    seeds = parse_seeds("0,1")      # [0, 1]
"""

from __future__ import annotations

from pathlib import Path

from quant.errors import UserError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "calibration_data" / "prompts"
# eval.txt and calibration.txt hold open-ended prompts; shapes_eval.txt and shapes_calibration.txt
# are prompts of the shapes world (metrics.shapes_world), judged for adherence.
DEFAULT_EVAL_PROMPTS = PROMPTS_DIR / "eval.txt"
DEFAULT_CALIBRATION_PROMPTS = PROMPTS_DIR / "calibration.txt"
MAX_SEED = 2**63 - 1


def read_prompts(path: Path) -> list[str]:
    """The prompts in ``path``, in file order (without their ``| tags``).

    Raises:
        UserError: the file is missing, unreadable, not UTF-8, or holds no prompt.
    """
    return [prompt for prompt, _ in read_prompt_entries(path)]


def read_prompt_entries(path: Path) -> list[tuple[str, list[str]]]:
    """(prompt, tags after ``|``) for each prompt in ``path``, in file order (empty lists where none).

    Raises:
        UserError: as ``read_prompts``, and for a line with tags but no prompt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: prompt file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read prompt file ({exc.strerror or exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    entries = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        prompt, bar, tags = (part.strip() for part in line.partition("|"))
        if not prompt:
            raise UserError(f"{path}:{number}: a line with tags ('| {tags}') but no prompt before them")
        entries.append((prompt, [t.strip() for t in tags.split(",") if t.strip()] if bar else []))
    if not entries:
        raise UserError(f"{path}: prompt file is empty (expected one prompt per line)")
    return entries


def prompt_id(index: int) -> str:
    """Stable id of the prompt at ``index`` in its file: ``p00``, ``p01``, ..."""
    return f"p{index:02d}"


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0,1,7"`` into ``[0, 1, 7]``.

    Raises:
        UserError: empty, non-integer, negative, too large or repeated seeds.
    """
    parts = [p.strip() for p in str(text).split(",")]
    seeds = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or int(part) > MAX_SEED:  # '²'.isdigit() is True
            raise UserError(f"--seeds: '{text}' is not a comma-separated list of integers in [0, 2**63-1] (bad: '{part}')")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: '{text}' repeats a seed")
    return seeds
