"""File-backed tasks: problems read from a JSONL or parquet file, and the named benchmarks built on them.

`FileTask` ("file" in the task registry) turns each record into a `Problem` through configurable
field names. Its held-out split is decided per problem by a stable hash of the problem id, so the
split does not depend on file order, never overlaps, and is the same on every machine and run.
Each entry of `r1kit.data.BENCHMARKS` is registered as a task of its own name ("math500", "gsm8k",
"aime24"), an evaluation-only FileTask (`test_fraction=1.0`) over the file in `$R1KIT_DATA_DIR`.

    make_task("file", path="my.jsonl", problem_field="question", id_field="uid", test_fraction=0.1)
    make_task("gsm8k").test_problems()   # 1,319 problems, answer_style "numeric"

Parsed files are cached per (path, mtime, size), so building several tasks over one file, or one
task many times, reads and parses it once. Parquet needs pyarrow (`pip install 'r1kit[parquet]'`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable

from r1kit.data import BENCHMARKS, require_data_file
from r1kit.tasks.base import register_task
from r1kit.types import CodeTests, Problem, R1KitError

# (location label, record), e.g. ("line 3", {...}); the label is what error messages quote.
Record = tuple[str, dict[str, Any]]

_CACHE: dict[Path, tuple[tuple[int, int], tuple[Record, ...]]] = {}
_CACHE_MAX_FILES = 16  # a run touches a handful of files; the bound only guards long-lived processes


# ----------------------------------------------------------------------------- reading files


def _read_jsonl(path: Path) -> list[Record]:
    """Records of a JSONL file, labelled by 1-based line number; blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise R1KitError(f"{path}: not UTF-8 text ({e})") from e
    records: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise R1KitError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(rec, dict):
            raise R1KitError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((f"line {lineno}", rec))
    return records


def _read_parquet(path: Path) -> list[Record]:
    """Records of a parquet file, labelled by 0-based row index (as pandas and pyarrow count)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise R1KitError(
            f"{path}: reading parquet files needs pyarrow, which is not installed; "
            "`pip install 'r1kit[parquet]'` (or `pip install pyarrow`), or convert the file to JSONL"
        ) from e
    try:
        rows = pq.read_table(path).to_pylist()  # nested columns become plain lists/dicts
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise R1KitError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e
    return [(f"row {i}", rec) for i, rec in enumerate(rows)]


_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet}


def load_records(path: str | os.PathLike[str]) -> tuple[Record, ...]:
    """All records of a JSONL or parquet file as (location label, dict), cached per path + mtime + size.

    The returned dicts are shared with the cache: read them, never mutate them.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise R1KitError(f"data file not found: {p}" + ("" if p.exists() else " (no such file)"))
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise R1KitError(f"{p}: unsupported file type {p.suffix!r}; expected one of {sorted(_READERS)}")
    st = p.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(p)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    records = tuple(reader(p))
    if not records:
        raise R1KitError(f"{p}: the file has no records")
    if len(_CACHE) >= _CACHE_MAX_FILES:
        _CACHE.pop(next(iter(_CACHE)))  # oldest entry first (dicts keep insertion order)
    _CACHE[p] = (stamp, records)
    return records


# ----------------------------------------------------------------------------- records -> problems


def _field(rec: dict[str, Any], name: str, role: str, where: str) -> Any:
    """rec[name], or an error naming the field, its role, the record's location and the fields it has."""
    if name not in rec:
        raise R1KitError(f"{where}: record has no field {name!r} ({role}); its fields are {sorted(rec)}")
    return rec[name]


def _text(value: Any, name: str, role: str, where: str, *, allow_empty: bool = False) -> str:
    """A string field; numbers are accepted and written out (e.g. an integer answer 18 -> "18")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise R1KitError(f"{where}: field {name!r} ({role}) must be a string or number, got {type(value).__name__}")
    value = value.strip()
    if not value and not allow_empty:
        raise R1KitError(f"{where}: field {name!r} ({role}) is empty")
    return value


def heldout_score(problem_id: str, salt: str = "") -> float:
    """A uniform-looking number in [0, 1) fixed by the id alone: the id is held out iff score < test_fraction.

    sha256 rather than hash(): Python salts str hashes per process, and the split must not move.
    """
    digest = hashlib.sha256(f"{salt}\x00{problem_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def records_to_problems(
    records: Iterable[Record],
    *,
    source: str,
    task: str,
    problem_field: str,
    answer_field: str,
    id_field: str | None,
    answer_style: str,
    solution_field: str | None,
    meta_fields: Iterable[str],
    tests_field: str | None = None,
) -> list[Problem]:
    """Build and validate one Problem per record; `source` (the file) prefixes every error message.

    `tests_field` names a field of code tests (see CodeTests.from_json); answer_style "code" needs one, and its
    answer field (a reference solution) may be absent."""
    meta_fields = list(meta_fields)
    if answer_style == "code" and tests_field is None:
        raise R1KitError(f"{source}: answer_style 'code' needs tests_field (the record field holding each problem's tests)")
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}  # id -> location of its first record
    for index, (loc, rec) in enumerate(records):
        where = f"{source} {loc}"
        if id_field is None:
            pid = str(index)  # the record's position: ties the split to file order (set id_field to avoid)
        else:
            pid = _text(_field(rec, id_field, "id_field", where), id_field, "id_field", where)
        if pid in first_seen:
            raise R1KitError(f"{where}: duplicate id {pid!r} (first seen at {first_seen[pid]}); ids must be unique")
        first_seen[pid] = loc
        question = _text(_field(rec, problem_field, "problem_field", where), problem_field, "problem_field", where)
        if answer_style == "code" and not rec.get(answer_field):
            answer = ""
        else:
            answer = _text(_field(rec, answer_field, "answer_field", where), answer_field, "answer_field", where)
        tests = None
        if tests_field is not None:
            tests = CodeTests.from_json(_field(rec, tests_field, "tests_field", where), f"{where}: field {tests_field!r}")
        solution = ""
        if solution_field is not None:
            raw = _field(rec, solution_field, "solution_field", where)
            solution = "" if raw is None else _text(raw, solution_field, "solution_field", where, allow_empty=True)
        # deepcopy: meta may hold nested lists/dicts, and the parsed records are shared through the cache
        meta = {f: copy.deepcopy(_field(rec, f, "meta_fields", where)) for f in meta_fields}
        problems.append(Problem(pid, question, answer, answer_style, task, solution, meta, tests))
    return problems


# ----------------------------------------------------------------------------- the task


def _draw(pool: list[Problem], n: int, rng: random.Random) -> list[Problem]:
    """`n` problems from `pool`: whole shuffled passes, then a sample without replacement for the rest,
    so that no problem is drawn twice more often than another."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[Problem] = []
    while n - len(out) >= len(pool):
        epoch = list(pool)
        rng.shuffle(epoch)
        out.extend(epoch)
    out.extend(rng.sample(pool, n - len(out)))
    return out


@register_task("file")
class FileTask:
    """Problems from a JSONL or parquet file, split into train / held-out by a stable hash of the id.

    Args:
        path: the .jsonl or .parquet file.
        task_name: the task's name, stamped on each Problem (`Problem.task`); not `name`, which
            `make_task(name, **options)` takes for itself.
        problem_field / answer_field: record fields holding the question text and the reference answer.
        id_field: record field holding a unique id; None = the record's index (then the split follows
            file order, so set it whenever the file may be reordered or extended).
        answer_style: the grader for every problem ("exact", "numeric", "math", "countdown").
        solution_field: record field with a worked solution (None: no solution).
        meta_fields: record fields copied into `Problem.meta` (nested values kept as they are).
        tests_field: record field holding code tests (answer_style "code"): {"entry_point", "asserts"} or
            {"cases": [{"stdin", "stdout"}]}; see r1kit.types.CodeTests.from_json.
        test_fraction: share of ids held out, in [0, 1]; 1.0 makes an evaluation-only set.
        split_salt: changes which ids are held out while keeping the split stable and disjoint.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        task_name: str = "file",
        problem_field: str = "problem",
        answer_field: str = "answer",
        id_field: str | None = None,
        answer_style: str = "exact",
        solution_field: str | None = None,
        meta_fields: Iterable[str] = (),
        test_fraction: float = 0.1,
        split_salt: str = "",
        tests_field: str | None = None,
    ) -> None:
        if not 0.0 <= float(test_fraction) <= 1.0:
            raise R1KitError(f"task {task_name!r}: test_fraction must be in [0, 1], got {test_fraction}")
        if isinstance(meta_fields, str):  # "a,b" is a likely typo for ["a", "b"]; a str would iterate chars
            raise R1KitError(f"task {task_name!r}: meta_fields must be a list of field names, got the string {meta_fields!r}")
        self.name = task_name
        self.path = Path(path).expanduser().resolve()
        self.test_fraction = float(test_fraction)
        problems = records_to_problems(
            load_records(self.path),
            source=str(self.path),
            task=task_name,
            problem_field=problem_field,
            answer_field=answer_field,
            id_field=id_field,
            answer_style=answer_style,
            solution_field=solution_field,
            meta_fields=meta_fields,
            tests_field=tests_field,
        )
        held = [heldout_score(p.id, split_salt) < self.test_fraction for p in problems]
        self._test = [p for p, h in zip(problems, held) if h]  # file order: stable for a given file
        self._train = [p for p, h in zip(problems, held) if not h]

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """`n` training problems drawn with `rng` (repeating whole passes when n exceeds the pool)."""
        if not self._train:
            why = (
                "it is an evaluation-only set (test_fraction=1.0)"
                if self.test_fraction >= 1.0
                else f"every one of its {len(self._test)} problems fell in the held-out split (test_fraction={self.test_fraction})"
            )
            raise R1KitError(f"task {self.name!r} ({self.path}) has no training problems: {why}")
        return _draw(self._train, n, rng)

    def test_problems(self) -> list[Problem]:
        """The held-out problems in file order."""
        return list(self._test)

    def __repr__(self) -> str:
        return f"FileTask(name={self.name!r}, path={str(self.path)!r}, train={len(self._train)}, test={len(self._test)})"


# ----------------------------------------------------------------------------- named benchmarks


def benchmark_task(key: str, **overrides: Any) -> FileTask:
    """The FileTask for `BENCHMARKS[key]` (evaluation-only unless overridden), file from $R1KIT_DATA_DIR."""
    if key not in BENCHMARKS:
        raise R1KitError(f"unknown benchmark {key!r}; known benchmarks: {sorted(BENCHMARKS)}")
    spec = {k: v for k, v in BENCHMARKS[key].items() if k not in ("file", "heldout_of")}
    options = {"task_name": key, "test_fraction": 1.0, **spec, **overrides}
    return FileTask(require_data_file(BENCHMARKS[key]["file"]), **options)


def _benchmark_factory(key: str):
    def factory(**overrides: Any) -> FileTask:
        return benchmark_task(key, **overrides)

    factory.__name__ = f"make_{key}"
    factory.__doc__ = f"The {key!r} benchmark ({BENCHMARKS[key]['file']} under $R1KIT_DATA_DIR)."
    return factory


for _key, _spec in BENCHMARKS.items():
    if "heldout_of" not in _spec:  # those rows belong to a synthetic task (e.g. countdown's held-out split)
        register_task(_key)(_benchmark_factory(_key))
