"""The typed values that travel between r1kit's stages (see DESIGN.md: every arrow is typed).

Task --Problem--> Template --prompt ids--> Engine --Rollout--> Rewards --> advantages --> loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class R1KitError(Exception):
    """A user-facing error: bad config, data file, model path or input. Its message names the culprit."""


@dataclass(frozen=True)
class IOCase:
    """One stdin/stdout test of a program (competitive-programming style)."""

    stdin: str
    stdout: str  # the expected output, compared after whitespace normalisation (r1kit.sandbox.normalize_output)


@dataclass(frozen=True)
class CodeTests:
    """How a program that answers a problem is tested (answer_style "code"); run by r1kit.sandbox.

    kind "assert": each of `asserts` is Python source run by a trusted harness that calls the program's
    function `entry_point` as `candidate` (e.g. "assert candidate(2, 3) == 5", or HumanEval's
    "def check(candidate): ...\ncheck(candidate)"); `setup` is the problem's own helper code, run before them.
    kind "stdio": the program is run once per case with its stdin, and must print its stdout.
    `prompt` (HumanEval's signature and docstring) is put before a program that does not define
    `entry_point` itself, so a completion may be the function's body only.
    """

    kind: str  # "assert" | "stdio"
    entry_point: str = ""
    asserts: tuple[str, ...] = ()
    setup: str = ""
    cases: tuple[IOCase, ...] = ()
    prompt: str = ""
    timeout_s: float = 5.0  # wall-clock limit per run (per case for stdio)

    def __post_init__(self) -> None:
        if self.kind == "assert":
            if not self.entry_point.isidentifier() or not self.asserts:
                raise R1KitError(f"assert tests need an entry_point that is a Python name (got {self.entry_point!r}) "
                                 f"and at least one assert (got {len(self.asserts)})")
        elif self.kind == "stdio":
            if not self.cases:
                raise R1KitError("stdio tests need at least one case")
        else:
            raise R1KitError(f"tests kind must be 'assert' or 'stdio', got {self.kind!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s <= 600:
            raise R1KitError(f"tests timeout_s must be in (0, 600], got {self.timeout_s!r}")

    @property
    def count(self) -> int:
        return len(self.asserts) if self.kind == "assert" else len(self.cases)

    @classmethod
    def from_json(cls, obj: Any, where: str = "tests") -> "CodeTests":
        """From a record's field: {"entry_point": "f", "asserts": [...], "setup"?: str, "prompt"?: str} or
        {"cases": [{"stdin": str, "stdout": str}, ...]}, each with an optional "timeout_s"."""
        if not isinstance(obj, dict):
            raise R1KitError(f"{where}: expected an object with 'asserts' or 'cases', got {type(obj).__name__}")
        known = {"entry_point", "asserts", "setup", "prompt", "cases", "timeout_s"}
        if set(obj) - known or ("asserts" in obj) == ("cases" in obj):
            raise R1KitError(f"{where}: expected exactly one of 'asserts' or 'cases' (and only {sorted(known)}); "
                             f"got keys {sorted(obj)}")
        strings = lambda name: _str_list(obj.get(name), f"{where}.{name}")  # noqa: E731
        timeout = obj.get("timeout_s", 5.0)
        if "asserts" in obj:
            return cls("assert", str(obj.get("entry_point", "")), tuple(strings("asserts")),
                       _str(obj.get("setup", ""), f"{where}.setup"), prompt=_str(obj.get("prompt", ""), f"{where}.prompt"),
                       timeout_s=timeout)
        cases = obj["cases"]
        if not isinstance(cases, list) or not all(isinstance(c, dict) and set(c) == {"stdin", "stdout"} for c in cases):
            raise R1KitError(f"{where}.cases: expected a list of {{'stdin': str, 'stdout': str}} objects")
        return cls("stdio", cases=tuple(IOCase(_str(c["stdin"], f"{where}.cases"), _str(c["stdout"], f"{where}.cases"))
                                        for c in cases), timeout_s=timeout)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise R1KitError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise R1KitError(f"{where}: expected a list of strings")
    return value


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    `answer_style` picks the grader (see r1kit.rewards.graders.GRADERS):
    "exact" (string equality after strip), "numeric" (integer/decimal equality),
    "math" (math-verify equivalence), "countdown" (expression uses `meta["nums"]` once each
    and equals int(answer)), "code" (the program passes `tests` in the sandbox; `answer` is a reference
    solution, possibly empty).
    """

    id: str
    question: str  # the problem text shown to the model, without any template
    answer: str  # the reference final answer
    answer_style: str = "exact"
    task: str = ""  # name of the task that produced it
    solution: str = ""  # a reference worked solution, if the source has one
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    tests: CodeTests | None = None  # answer_style "code": how a program is checked


@dataclass
class Rollout:
    """G sampled completions for each of P prompts, flattened prompt-major (row = p * G + g).

    Right-padded with `pad_id`; masks are 1 on real tokens.
    """

    prompt_ids: torch.Tensor  # [N, Tp] long, left-padded prompts (N = P*G)
    prompt_mask: torch.Tensor  # [N, Tp] long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, Tc] long, right-padded completions (EOS included if emitted)
    completion_mask: torch.Tensor  # [N, Tc] float, 1 on generated tokens (incl. EOS)
    logprobs: torch.Tensor  # [N, Tc] float32, sampler's log p of each generated token (0 on padding)
    truncated: torch.Tensor  # [N] bool, True where max_new_tokens was reached without EOS
    group_size: int  # G

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # [N] long
        return self.completion_mask.sum(-1).long()
