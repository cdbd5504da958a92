"""Math-verifier hardening: the static pre-check, workers that die with their parent, the language reward's cost."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
import unicodedata

import pytest

from r1kit.rewards import mathverify
from r1kit.rewards.graders import grade
from r1kit.rewards.language import language_reward, script_of, word_scripts
from r1kit.rewards.mathverify import too_costly
from r1kit.types import Problem

ADVERSARIAL = ["9^{9^{9^{9}}}", "10^{10^{10^{10}}}!", "{" * 3000 + "1" + "}" * 3000, "(" * 5000, "9^{99999999}",
               "9**9**9**9", "9^9^9", "100000!", "(10^{5})!", "2^{2^{2^{2^{2}}}}", "x^{9^{9^{9}}}", "10^{-10000000}"]
ORDINARY = ["2^{10}", "e^{x^{2}}", "10^{100}", "\\frac{1}{2}", "5!", "3!+4!", "x^{y^{z}}", "2^{2^{10}}", "10,\\!000",
            "\\{1,2\\}", "a != b", "1.5^{2}", "(3)!", "\\left(\\frac{1}{2}\\right)^{2}", "2^{-3}", "(-2)^{3}", "20!"]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_costly_answers_are_refused_statically_and_cheaply(answer):
    start = time.process_time()
    assert too_costly(answer) is not None
    v = grade(f"<think> x </think> <answer> {answer} </answer>", Problem("p", "q", "5", "math"))
    assert not v.correct and v.reason.split(":")[0] in ("too costly", "too long")
    assert time.process_time() - start < 0.05  # CPU time: the machine's load cannot fail it


@pytest.mark.parametrize("answer", ORDINARY)
def test_ordinary_answers_pass_the_precheck(answer):
    assert too_costly(answer) is None


@pytest.mark.data
def test_no_benchmark_reference_answer_is_refused(data_dir):
    for path in ("math500/math500.jsonl", "aime24/aime24.jsonl"):
        answers = [json.loads(line)["answer"] for line in (data_dir / path).read_text().splitlines() if line.strip()]
        assert [a for a in answers if too_costly(str(a))] == []


def test_the_precheck_leaves_right_answers_right():
    assert mathverify.verify_math("2^{10}", "1024").correct
    assert mathverify.verify_math("\\frac{10!}{9!}", "10").correct


def test_a_busy_worker_dies_with_its_parent_after_kill_9(tmp_path):
    """The defect measured before: a worker spinning on 9^{9^{9^{9}}} survived kill -9 of its parent."""
    script = tmp_path / "spin.py"
    script.write_text(textwrap.dedent("""
        from r1kit.rewards import mathverify
        mathverify.warm_up()
        print(" ".join(str(w.proc.pid) for w in list(mathverify.get_pool()._idle.queue)), flush=True)
        while True:
            mathverify.verify_math("9^{9^{9^{9}}}", "5", timeout_s=60, precheck=False)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    workers = [int(x) for x in proc.stdout.readline().split()]
    assert workers
    time.sleep(1.0)  # one worker is now busy inside sympy
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers outlived their parent: {[p for p in workers if _alive(p)]}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_word_scripts_equals_the_per_character_definition():
    rng = random.Random(0)
    texts = ["".join(chr(c) for c in range(1, 0x3100)), "abcЖж漢字 x1y Ωmega ǅ ×÷ ²½"]
    texts += ["".join(chr(rng.randrange(1, 0x3100)) if rng.random() < 0.5 else rng.choice("ab cЖ漢 1") for _ in range(300))
              for _ in range(50)]
    for text in texts:
        words, current = [], None
        for ch in unicodedata.normalize("NFC", text):
            s = script_of(ch)
            if s is None:
                current = None
            elif s == "cjk" or s != current:
                words.append(s)
                current = s
        assert word_scripts(text) == words


def test_language_reward_on_100k_characters_is_cheap():
    rng = random.Random(0)
    alphabet = "abcdefghij 0123456789+=.,漢字得ЖжΩ"
    text = "<think> " + "".join(rng.choice(alphabet) for _ in range(100_000)) + " </think> <answer> 1 </answer>"
    language_reward(text, Problem("p", "q", "1"))  # builds the scanner once
    start = time.process_time()
    for _ in range(5):
        language_reward(text, Problem("p", "q", "1"))
    assert (time.process_time() - start) / 5 < 0.05
