"""Countdown: combine 3-4 numbers with + - * / (each used exactly once) to reach a target.

The TinyZero reproduction of R1-Zero (Jiayi-Pan/TinyZero) made this the standard small-scale RL task:
the answer is easy to verify and impossible to guess. `CountdownTask` ("countdown" in the registry)
generates problems by building a random expression tree over random numbers, so every target is
reachable by construction, and phrases them exactly as the real test file does:
"Using the numbers [96, 7, 37, 74], create an equation that equals 55."

Held-out split: `heldout="synthetic"` (default) is a fixed generated set, so the task works without
data; `heldout="file"` uses the 2,001 real rows of countdown/countdown_test.jsonl (under
$R1KIT_DATA_DIR). Either way, training never yields a held-out (sorted numbers, target) pair.

Departures from the game show and from TinyZero: the generator keeps every intermediate a positive
integer (exact divisions only), so each problem has a solution that a float evaluator grades without
rounding doubt; targets default to 1..999 (the real rows use 10..100: pass target_range=(10, 100)
to match them). `solve(nums, target)` is a brute-force reference solver, for worked solutions and
cold-start data; grading lives in r1kit.rewards.graders ("countdown" answer style).
"""
from __future__ import annotations

import ast
import random
from fractions import Fraction
from typing import Any, NamedTuple

from r1kit.tasks.base import register_task
from r1kit.types import Problem, R1KitError

QUESTION = "Using the numbers {nums}, create an equation that equals {target}."
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3  # precedence of a bare number: never needs parentheses


class _Node(NamedTuple):
    value: int | Fraction  # exact value of the sub-expression
    expr: str  # its text, with only the parentheses precedence requires
    prec: int  # precedence of its top operator (_ATOM for a number)


def _join(op: str, a: _Node, b: _Node, value: int | Fraction) -> _Node:
    """`a op b` as text. Operators are left-associative: the right operand needs parentheses at equal
    precedence under - and / (a - (b + c) != a - b + c), but not under + and * (a + (b - c) == a + b - c)."""
    p = _PREC[op]
    left = a.expr if a.prec >= p else f"({a.expr})"
    right = b.expr if b.prec > p or (b.prec == p and op in "+*") else f"({b.expr})"
    return _Node(value, f"{left} {op} {right}", p)


def _combinations(a: _Node, b: _Node, integer_only: bool) -> list[_Node]:
    """Every node one operator makes from the unordered pair {a, b}; integer_only keeps exact divisions."""
    x, y = a.value, b.value
    out = [_join("+", a, b, x + y), _join("*", a, b, x * y), _join("-", a, b, x - y), _join("-", b, a, y - x)]
    for num, den, n_node, d_node in ((x, y, a, b), (y, x, b, a)):
        if den == 0:
            continue
        if integer_only:
            if num % den == 0:
                out.append(_join("/", n_node, d_node, num // den))
        else:
            out.append(_join("/", n_node, d_node, Fraction(num) / Fraction(den)))
    return out


def _search(nodes: list[_Node], target: int, integer_only: bool) -> str | None:
    """Depth-first over all ways to merge two nodes into one until a single node equals `target`.

    4 numbers: 6 pairs x 6 ops, then 3 x 6, then 1 x 6 = 3,888 complete expressions at most.
    """
    if len(nodes) == 1:
        return nodes[0].expr if nodes[0].value == target else None
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            rest = nodes[:i] + nodes[i + 1 : j] + nodes[j + 1 :]
            for merged in _combinations(nodes[i], nodes[j], integer_only):
                found = _search(rest + [merged], target, integer_only)
                if found is not None:
                    return found
    return None


def solve(nums: list[int], target: int, *, allow_fractions: bool = True) -> str | None:
    """An expression using each of `nums` exactly once with + - * / and parentheses that equals
    `target`, or None if there is none.

    Expressions whose every intermediate is an integer are searched first (they read naturally and
    evaluate exactly in floating point); only then, if `allow_fractions`, ones such as 6 / (1 - 3 / 4).
    """
    if not nums or any(not isinstance(n, int) or isinstance(n, bool) for n in nums):
        raise ValueError(f"nums must be a non-empty list of ints, got {nums!r}")
    leaves = [_Node(n, str(n), _ATOM) if n >= 0 else _Node(n, f"({n})", _ATOM) for n in nums]
    found = _search(leaves, target, integer_only=True)
    if found is None and allow_fractions:
        found = _search([leaf._replace(value=Fraction(leaf.value)) for leaf in leaves], target, integer_only=False)
    return found


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression of non-negative integers, + - * / and parentheses, and
    the integers it uses (in order of appearance). Anything else (names, calls, powers, floats) and
    division by zero raise ValueError. For the solver's tests; graders have their own."""
    if len(expr) > 1000:
        raise ValueError(f"expression too long ({len(expr)} characters)")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e
    used: list[int] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            num, den = ev(node.left), ev(node.right)
            if den == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return num / den
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported element {ast.dump(node)[:60]} in {expr!r}")

    return ev(tree.body), used


# ----------------------------------------------------------------------------- the task


def problem_key(nums: list[int], target: int | str) -> tuple[tuple[int, ...], int]:
    """What makes two Countdown problems the same: the multiset of numbers and the target."""
    return tuple(sorted(nums)), int(target)


def make_problem(nums: list[int], target: int, *, pid: str | None = None, solution: str = "") -> Problem:
    """A Countdown Problem worded like the real test file; the grader reads meta["nums"]."""
    pid = pid if pid is not None else "countdown-" + "_".join(map(str, sorted(nums))) + f"-{target}"
    question = QUESTION.format(nums=list(nums), target=target)
    return Problem(pid, question, str(target), "countdown", "countdown", solution, {"nums": list(nums)})


def _check_range(name: str, value: Any, low: int) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise R1KitError(f"countdown: {name} must be a pair (low, high) of integers, got {value!r}") from e
    if not low <= lo <= hi:
        raise R1KitError(f"countdown: {name} must satisfy {low} <= low <= high, got {value!r}")
    return lo, hi


@register_task("countdown")
class CountdownTask:
    """Synthetic Countdown problems with a fixed held-out split.

    Args:
        num_count: (min, max) how many numbers per problem; default 3-4 like the real set.
        num_range: (low, high) inclusive range of each number (drawn with replacement).
        target_range: (low, high) inclusive range of targets kept.
        heldout: "synthetic" (a fixed generated set of `num_test` problems) or "file" (the real
            countdown/countdown_test.jsonl rows under $R1KIT_DATA_DIR).
        num_test: size of the synthetic held-out set.
        heldout_seed: seed of the synthetic held-out set (the same seed always gives the same set).
    """

    name = "countdown"
    _MAX_TRIES = 10_000  # per problem; with the defaults a tree lands in range about half the time

    def __init__(
        self,
        *,
        num_count: tuple[int, int] = (3, 4),
        num_range: tuple[int, int] = (1, 99),
        target_range: tuple[int, int] = (1, 999),
        heldout: str = "synthetic",
        num_test: int = 200,
        heldout_seed: int = 1234,
    ) -> None:
        self.num_count = _check_range("num_count", num_count, 2)
        self.num_range = _check_range("num_range", num_range, 1)
        self.target_range = _check_range("target_range", target_range, 1)
        if heldout == "synthetic":
            if num_test < 0:
                raise R1KitError(f"countdown: num_test must be >= 0, got {num_test}")
            self._test = self._synthetic_heldout(num_test, random.Random(heldout_seed))
        elif heldout == "file":
            from r1kit.tasks.files import benchmark_task  # imported here: only this option needs files

            self._test = benchmark_task("countdown", task_name="countdown").test_problems()
        else:
            raise R1KitError(f"countdown: heldout must be 'synthetic' or 'file', got {heldout!r}")
        self._held_keys = {problem_key(p.meta["nums"], p.answer) for p in self._test}

    def _generate(self, rng: random.Random) -> tuple[list[int], int, str]:
        """One (nums, target, expression) from a random expression tree whose every intermediate is a
        positive integer: a - b only when a > b, a / b only when b divides a."""
        lo_t, hi_t = self.target_range
        count = rng.randint(*self.num_count)  # drawn once: retrying it would favour the in-range-prone sizes
        for _ in range(self._MAX_TRIES):
            nums = [rng.randint(*self.num_range) for _ in range(count)]
            nodes = [_Node(n, str(n), _ATOM) for n in nums]
            while len(nodes) > 1:
                a, b = (nodes.pop(rng.randrange(len(nodes))) for _ in range(2))
                a, b = (a, b) if a.value >= b.value else (b, a)  # a >= b, so a - b >= 0 and a / b >= 1
                ops = ["+", "*"] + (["-"] if a.value > b.value else []) + (["/"] if a.value % b.value == 0 else [])
                op = rng.choice(ops)
                value = {"+": a.value + b.value, "*": a.value * b.value, "-": a.value - b.value}.get(op)
                nodes.append(_join(op, a, b, value if value is not None else a.value // b.value))
            if lo_t <= nodes[0].value <= hi_t:
                return nums, int(nodes[0].value), nodes[0].expr
        raise R1KitError(
            f"countdown: no target in target_range={self.target_range} after {self._MAX_TRIES} tries "
            f"with num_count={self.num_count}, num_range={self.num_range}; widen target_range"
        )

    def _synthetic_heldout(self, n: int, rng: random.Random) -> list[Problem]:
        problems: list[Problem] = []
        seen: set[tuple[tuple[int, ...], int]] = set()
        tries = 0
        while len(problems) < n:
            tries += 1
            if tries > 100 * n:  # distinct keys are plentiful; this only stops a degenerate config
                raise R1KitError(f"countdown: only {len(problems)} distinct problems found for num_test={n}; shrink it")
            nums, target, expr = self._generate(rng)
            if problem_key(nums, target) not in seen:
                seen.add(problem_key(nums, target))
                problems.append(make_problem(nums, target, pid=f"countdown-heldout-{len(problems):04d}", solution=expr))
        return problems

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """`n` generated problems (solution = the generating expression), none with a held-out key."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[Problem] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 100:  # only a held-out set covering nearly every problem gets here
                raise R1KitError("countdown: the held-out set covers almost every problem of this configuration")
            nums, target, expr = self._generate(rng)
            if problem_key(nums, target) not in self._held_keys:
                out.append(make_problem(nums, target, solution=expr))
        return out

    def test_problems(self) -> list[Problem]:
        return list(self._test)
