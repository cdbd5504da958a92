"""File-backed tasks (r1kit.tasks.files), the data directory (r1kit.data) and the named benchmarks."""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from r1kit.data import BENCHMARKS, DATA_ENV, data_dir, require_data_file
from r1kit.tasks import make_task
from r1kit.tasks.files import FileTask, load_records
from r1kit.types import Problem, R1KitError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def custom_records(n: int = 40) -> list[dict]:
    """Records with non-default field names, integer answers and nested metadata."""
    return [
        {
            "uid": f"q{i:03d}",
            "q": f"What is {i} + {i}?",
            "ans": 2 * i if i % 2 else str(2 * i),  # numbers and strings both occur in real files
            "sol": f"{i} + {i} = {2 * i}",
            "tags": ["add", f"t{i % 3}"],
            "info": {"level": i % 5, "src": {"x": i}},
            "unused": None,
        }
        for i in range(n)
    ]


CUSTOM = dict(
    problem_field="q",
    answer_field="ans",
    id_field="uid",
    answer_style="numeric",
    solution_field="sol",
    meta_fields=["tags", "info"],
    test_fraction=0.3,
)


def expected_problems(records: list[dict], task: str) -> dict[str, Problem]:
    return {
        r["uid"]: Problem(r["uid"], r["q"], str(r["ans"]), "numeric", task, r["sol"], {"tags": r["tags"], "info": r["info"]})
        for r in records
    }


def check_round_trip(task: FileTask, records: list[dict]) -> None:
    expected = expected_problems(records, task.name)
    test = task.test_problems()
    train = task.train_problems(len(records) - len(test), random.Random(0))  # n = pool: one full pass
    got = {p.id: p for p in test + train}
    assert len(got) == len(test) + len(train) == len(records)
    for pid, p in got.items():
        assert p == expected[pid]
        assert p.meta == expected[pid].meta  # meta is excluded from Problem equality


# ----------------------------------------------------------------------------- round trips


def test_jsonl_round_trip_custom_fields(tmp_path):
    records = custom_records()
    task = make_task("file", path=write_jsonl(tmp_path / "p.jsonl", records), task_name="mine", **CUSTOM)
    assert task.name == "mine"
    check_round_trip(task, records)
    assert 0 < len(task.test_problems()) < len(records)


def test_parquet_round_trip_custom_fields(tmp_path):
    records = [dict(r, ans=int(r["ans"])) for r in custom_records()]  # a parquet column has one type
    task = make_task("file", path=write_parquet(tmp_path / "p.parquet", records), task_name="pq", **CUSTOM)
    check_round_trip(task, records)
    # The same records in JSONL give the same split and the same problems, in the same order.
    twin = make_task("file", path=write_jsonl(tmp_path / "p.jsonl", records), task_name="pq", **CUSTOM)
    assert task.test_problems() == twin.test_problems()


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "p.parquet", [dict(r, ans=int(r["ans"])) for r in custom_records(3)])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(R1KitError, match=r"needs pyarrow.*pip install") as e:
        FileTask(path)
    assert str(path) in str(e.value)


def test_default_id_is_the_record_index(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(5)])
    task = FileTask(path, test_fraction=1.0)
    assert [(p.id, p.answer) for p in task.test_problems()] == [(str(i), str(i)) for i in range(5)]


# ----------------------------------------------------------------------------- split


def test_split_is_disjoint_stable_under_reordering_and_salted(tmp_path):
    records = [{"id": f"item-{i}", "problem": f"p{i}", "answer": str(i)} for i in range(400)]
    a = FileTask(write_jsonl(tmp_path / "a.jsonl", records), id_field="id", test_fraction=0.25)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    b = FileTask(write_jsonl(tmp_path / "b.jsonl", shuffled), id_field="id", test_fraction=0.25)
    test_ids = {p.id for p in a.test_problems()}
    assert test_ids == {p.id for p in b.test_problems()}
    assert 0.15 < len(test_ids) / len(records) < 0.35  # binomial(400, 0.25): 8 standard deviations wide
    train_ids = {p.id for p in a.train_problems(2000, random.Random(1))}
    assert train_ids and not train_ids & test_ids
    assert train_ids | test_ids == {r["id"] for r in records}
    salted = FileTask(tmp_path / "a.jsonl", id_field="id", test_fraction=0.25, split_salt="other")
    assert {p.id for p in salted.test_problems()} != test_ids
    # A larger fraction only adds ids: held out at 0.25 stays held out at 0.5.
    wider = FileTask(tmp_path / "a.jsonl", id_field="id", test_fraction=0.5)
    assert test_ids < {p.id for p in wider.test_problems()}


def test_test_fraction_extremes(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"p{i}", "answer": "1"} for i in range(10)])
    assert FileTask(path, test_fraction=0.0).test_problems() == []
    eval_only = FileTask(path, test_fraction=1.0, task_name="evalset")
    assert len(eval_only.test_problems()) == 10
    with pytest.raises(R1KitError, match=r"'evalset'.*evaluation-only.*test_fraction=1\.0"):
        eval_only.train_problems(1, random.Random(0))
    for bad in (-0.1, 1.5):
        with pytest.raises(R1KitError, match="test_fraction must be in"):
            FileTask(path, test_fraction=bad)


def test_train_draws_are_balanced_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"p{i}", "answer": "1"} for i in range(7)])
    task = FileTask(path, test_fraction=0.0)
    draws = task.train_problems(2 * 7 + 3, random.Random(3))
    counts = Counter(p.id for p in draws)
    assert len(draws) == 17 and set(counts) == {str(i) for i in range(7)}
    assert set(counts.values()) <= {2, 3}  # whole passes first, then a sample without replacement
    assert draws == task.train_problems(17, random.Random(3))
    assert draws != task.train_problems(17, random.Random(4))
    assert task.train_problems(0, random.Random(0)) == []


# ----------------------------------------------------------------------------- bad input


def bad(tmp_path: Path, text: str, name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(R1KitError, match=r"data file not found: .*nope\.jsonl"):
        FileTask(tmp_path / "nope.jsonl")
    with pytest.raises(R1KitError, match=r"unsupported file type '\.csv'.*\.jsonl"):
        FileTask(bad(tmp_path, "a,b\n", "p.csv"))


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_file(tmp_path, text):
    path = bad(tmp_path, text)
    with pytest.raises(R1KitError, match="has no records") as e:
        FileTask(path)
    assert str(path) in str(e.value)


def test_invalid_json_names_file_and_line(tmp_path):
    ok = json.dumps({"problem": "p", "answer": "1"})
    path = bad(tmp_path, f"{ok}\n\n{{'problem': oops}}\n{ok}\n")  # line 3 is broken (line 2 blank)
    with pytest.raises(R1KitError, match=r"bad\.jsonl line 3: invalid JSON") as e:
        FileTask(path)
    assert str(path) in str(e.value)
    with pytest.raises(R1KitError, match=r"line 2: expected a JSON object, got list"):
        FileTask(bad(tmp_path, f"{ok}\n[1, 2]\n", "list.jsonl"))


def test_missing_fields_name_field_line_and_fields_present(tmp_path):
    path = bad(tmp_path, json.dumps({"problem": "p", "answer": "1"}) + "\n" + json.dumps({"question": "q", "answer": "2"}) + "\n")
    with pytest.raises(R1KitError) as e:
        FileTask(path)
    msg = str(e.value)
    assert "line 2" in msg and "'problem'" in msg and "problem_field" in msg and "['answer', 'question']" in msg
    with pytest.raises(R1KitError, match=r"line 1: record has no field 'target' \(answer_field\)"):
        FileTask(path, answer_field="target")
    with pytest.raises(R1KitError, match=r"line 1: record has no field 'uid' \(id_field\)"):
        FileTask(path, id_field="uid")
    with pytest.raises(R1KitError, match=r"line 1: record has no field 'level' \(meta_fields\)"):
        FileTask(path, problem_field="answer", meta_fields=["level"])
    with pytest.raises(R1KitError, match=r"line 1: record has no field 'steps' \(solution_field\)"):
        FileTask(path, problem_field="answer", solution_field="steps")


@pytest.mark.parametrize("answer", ["", "   ", None, [1]])
def test_empty_or_malformed_answer(tmp_path, answer):
    rows = [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": answer}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    expected = "is empty" if isinstance(answer, str) else "must be a string or number"
    with pytest.raises(R1KitError, match=rf"line 2: field 'answer' \(answer_field\) {expected}"):
        FileTask(path)


def test_duplicate_ids_name_both_lines(tmp_path):
    rows = [{"id": "a", "problem": "p", "answer": "1"}, {"id": "b", "problem": "p", "answer": "1"}, {"id": "a", "problem": "q", "answer": "2"}]
    with pytest.raises(R1KitError, match=r"line 3: duplicate id 'a' \(first seen at line 1\)"):
        FileTask(write_jsonl(tmp_path / "p.jsonl", rows), id_field="id")


def test_meta_fields_as_a_string_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "p", "answer": "1", "a": 1}])
    with pytest.raises(R1KitError, match="meta_fields must be a list"):
        FileTask(path, meta_fields="a")


def test_bad_option_goes_through_make_task_as_r1kit_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(R1KitError, match="bad options"):
        make_task("file", path=path, answer_fields="x")


# ----------------------------------------------------------------------------- cache


def test_parsed_file_is_cached_until_it_changes(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", custom_records(5))
    first = load_records(path)
    assert load_records(path) is first  # no second parse
    write_jsonl(path, custom_records(6))  # different size, so a same-tick mtime cannot hide the change
    assert len(load_records(path)) == 6
    # Problems get their own copy of nested metadata: editing one never leaks into another task.
    a, b = (FileTask(path, id_field="uid", problem_field="q", answer_field="ans", meta_fields=["info"], test_fraction=1) for _ in range(2))
    a.test_problems()[0].meta["info"]["src"]["x"] = "edited"
    assert b.test_problems()[0].meta["info"]["src"]["x"] != "edited"


# ----------------------------------------------------------------------------- data directory


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_dir() is None
    with pytest.raises(R1KitError, match=rf"'gsm8k/x\.jsonl'.*{DATA_ENV} is not set.*export {DATA_ENV}="):
        require_data_file("gsm8k/x.jsonl")
    with pytest.raises(R1KitError, match=rf"{DATA_ENV}.*is not set"):
        make_task("math500")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(R1KitError, match=rf"{DATA_ENV}=.*missing.*does not name an existing directory"):
        data_dir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path.resolve()
    with pytest.raises(R1KitError, match=rf"'gsm8k/x\.jsonl' not found: looked for {tmp_path}/gsm8k/x\.jsonl"):
        require_data_file("gsm8k/x.jsonl")
    write_jsonl(tmp_path / "x.jsonl", [{"problem": "p", "answer": "1"}])
    assert require_data_file("x.jsonl") == tmp_path.resolve() / "x.jsonl"


def test_benchmarks_registered_from_the_dict(tmp_path, monkeypatch):
    """A fake data dir laid out like BENCHMARKS is enough: no per-file code stands between dict and task."""
    from r1kit.tasks.base import TASKS

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    for key, spec in BENCHMARKS.items():
        rec = {spec["id_field"]: "id-1", spec["problem_field"]: "p", spec["answer_field"]: "7"}
        rec.update({f: [1, 2] for f in spec["meta_fields"]})
        if spec["solution_field"]:
            rec[spec["solution_field"]] = "worked"
        (tmp_path / spec["file"]).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / spec["file"], [rec])
        if "heldout_of" in spec:
            continue
        (p,) = make_task(key).test_problems()
        assert (p.id, p.answer, p.answer_style, p.task) == ("id-1", "7", spec["answer_style"], key)
        assert set(p.meta) == set(spec["meta_fields"])
    assert {k for k, s in BENCHMARKS.items() if "heldout_of" not in s} <= set(TASKS)


# ----------------------------------------------------------------------------- the real benchmark files


@pytest.mark.data
@pytest.mark.parametrize(
    "name, count, style, meta",
    [("math500", 500, "math", {"subject", "level"}), ("gsm8k", 1319, "numeric", set()), ("aime24", 30, "math", {"url"})],
)
def test_named_benchmarks_load(data_dir, name, count, style, meta):
    task = make_task(name)
    problems = task.test_problems()
    assert len(problems) == count == len({p.id for p in problems})
    assert all(p.answer_style == style and p.task == name and p.question and p.answer for p in problems)
    assert all(set(p.meta) == meta and p.solution for p in problems)
    with pytest.raises(R1KitError, match="evaluation-only"):
        task.train_problems(1, random.Random(0))


@pytest.mark.data
def test_benchmark_contents(data_dir):
    gsm = make_task("gsm8k").test_problems()
    assert all(p.answer.lstrip("-").isdigit() and p.solution.rstrip().endswith(p.answer) for p in gsm[:50])
    assert "####" in gsm[0].solution
    math500 = make_task("math500").test_problems()
    assert {p.meta["level"] for p in math500} == {1, 2, 3, 4, 5}
    aime = make_task("aime24").test_problems()
    assert all(0 <= int(p.answer) <= 999 for p in aime) and aime[0].id == "2024-I-1"
