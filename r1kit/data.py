"""Where the shared benchmark files live, and how each named benchmark's records are laid out.

The benchmark files (MATH-500, GSM8K, AIME 2024, Countdown) are never shipped inside the package:
they sit in a data directory named by the environment variable `R1KIT_DATA_DIR`, laid out as in
`shared/data/README.md` (`<set>/<file>.jsonl`, one JSON object a line, `id`/`problem`/`answer` first).

`BENCHMARKS` is the only per-benchmark knowledge in r1kit: field names and answer styles, passed as
keyword arguments to `r1kit.tasks.files.FileTask`. Adding a benchmark is adding an entry here.

    export R1KIT_DATA_DIR=/path/to/shared/data
    python -c "from r1kit.tasks import make_task; print(len(make_task('math500').test_problems()))"
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from r1kit.types import R1KitError

DATA_ENV = "R1KIT_DATA_DIR"

# Per benchmark: "file" is relative to data_dir(); the other keys are FileTask options.
# "heldout_of" marks a file whose rows are the held-out split of a synthetic task of that name
# (so it is not registered as a task of its own: `make_task("countdown", heldout="file")`).
BENCHMARKS: dict[str, dict[str, Any]] = {
    "math500": {
        "file": "math500/math500.jsonl",
        "problem_field": "problem",
        "answer_field": "answer",
        "id_field": "id",
        "answer_style": "math",
        "solution_field": "solution",
        "meta_fields": ["subject", "level"],
    },
    "gsm8k": {
        "file": "gsm8k/gsm8k_test.jsonl",
        "problem_field": "problem",
        "answer_field": "answer",  # the integer after "####", commas removed
        "id_field": "id",
        "answer_style": "numeric",
        "solution_field": "orig_answer",  # the original worked solution ending "#### N"
        "meta_fields": [],
    },
    "aime24": {
        "file": "aime24/aime24.jsonl",
        "problem_field": "problem",
        "answer_field": "answer",  # str(int), e.g. "25" (the original "025" is in orig_answer)
        "id_field": "id",
        # "math" rather than "numeric": models often answer in LaTeX (\boxed{25}), which
        # math-verify reads and a plain number parser would not.
        "answer_style": "math",
        "solution_field": "solution",
        "meta_fields": ["url"],
    },
    "countdown": {
        "file": "countdown/countdown_test.jsonl",
        "problem_field": "problem",  # "Using the numbers [..], create an equation that equals T."
        "answer_field": "answer",  # str(target); the grader also needs meta["nums"]
        "id_field": "id",
        "answer_style": "countdown",
        "solution_field": None,
        "meta_fields": ["nums"],
        "heldout_of": "countdown",
    },
}


def data_dir() -> Path | None:
    """The benchmark data directory from `$R1KIT_DATA_DIR` (resolved, absolute), or None if unset.

    A set but missing directory is an error rather than None, so a typo is never read as "no data".
    """
    raw = os.environ.get(DATA_ENV, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise R1KitError(f"{DATA_ENV}={raw!r} does not name an existing directory (resolved to {path})")
    return path


def require_data_file(relpath: str | os.PathLike[str]) -> Path:
    """The absolute path of `relpath` under data_dir(); R1KitError naming what is missing and the fix."""
    root = data_dir()
    if root is None:
        raise R1KitError(
            f"data file {str(relpath)!r} needs the benchmark data directory, but {DATA_ENV} is not set; "
            f"set it to the folder holding {str(relpath)!r}, e.g. `export {DATA_ENV}=/path/to/shared/data`"
        )
    path = root / relpath
    if not path.is_file():
        raise R1KitError(
            f"data file {str(relpath)!r} not found: looked for {path} ({DATA_ENV}={os.environ[DATA_ENV]!r}); "
            f"point {DATA_ENV} at the folder that holds {str(relpath)!r}"
        )
    return path
