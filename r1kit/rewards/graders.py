"""Answer extraction and graders: the one verifier behind both the RL accuracy reward and evaluation.

A false negative teaches the policy that a right answer is wrong, so graders normalise what carries no
meaning (`$...$`, `\\boxed{}`, thousands commas, a `+` sign, a trailing period) but never accept a
different value. They sit on the RL hot path: "exact", "numeric" and "countdown" are graded in-process
in microseconds, and only "math" answers that a cheap check cannot settle go to math-verify, in the
time-limited worker pool of r1kit.rewards.mathverify.

    extract_answer(text)              # <answer> -> \\boxed{} -> "#### N" -> last number
    GRADERS[problem.answer_style](pred, problem) -> Verdict
    grade(completion, problem)        # extract, then grade
    grade_many(preds, problems)       # the batch form: "math" answers verified in parallel

Always extract first, then verify: math-verify alone does not find a number glued to tags
(`<answer>85</answer>`), and it misses some GSM8K `####` answers in a whole solution text.
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

from r1kit.rewards.mathverify import DEFAULT_TIMEOUT_S, verify_math, verify_math_many
from r1kit.rewards.quick_math import plainly_different
from r1kit.templates import parse_completion
from r1kit.types import Problem, R1KitError

MAX_NUMBER_CHARS = 512  # longer "numbers" are not parsed: int() of 10k digits is slow (and limited)
MAX_MATH_CHARS = 1000  # longer math answers are rejected before math-verify (real answers are short)
MAX_COUNTDOWN_CHARS = 256  # an expression over a handful of numbers is a few dozen characters


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # "correct", "no answer", "wrong value", "timeout", "unparseable", "too long", ...
    pred: str | None  # the answer that was graded (after extraction), None if there was none


# ----------------------------------------------------------------------------- extraction

_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)")
# A plain number: optional minus (not when it follows a digit/letter: "5-3" ends in 3, not -3),
# digits with optional thousands commas, optional decimals, optional "/denominator".
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]}])-)?(?<![\w.])"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?!\d)"
    r"|(?:(?<![\w.)\]}])-)?(?<![\w.])\.\d+"
)
_GSM8K = re.compile(r"####\s*([^\n]+)")


_BRACE = re.compile(r"(?<!\\)[{}]")  # \{ and \} are literal braces (set notation), not groups


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each "{" -> index of its matching "}" (unclosed ones are absent). One pass, so finding
    the last complete box among thousands of unclosed ones stays linear, not quadratic."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _box_content(text: str, cmd_end: int, pairs: dict[int, int]) -> tuple[str, int] | None:
    """(content, end) of what a \\boxed / \\fbox command ending at `cmd_end` boxes: a {...} group, or a
    `\\boxed 5` style token; None if the group is unclosed."""
    i = cmd_end
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        close = pairs.get(i)
        return (text[i + 1 : close], close + 1) if close is not None else None
    if i >= len(text) or (i == cmd_end and text[i].isalpha()):  # "\fboxsep" is another command
        return None
    m = re.match(r"[^\s$]+", text[i:])
    return (m.group(0), i + m.end()) if m else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete, non-empty \\boxed{...} or \\fbox{...} in `text` (nested braces
    handled)."""
    commands = list(_BOX_CMD.finditer(text))
    pairs = _brace_pairs(text) if commands else {}
    for m in reversed(commands):
        found = _box_content(text, m.end(), pairs)
        if found is not None and found[0].strip():
            return found[0].strip()
    return None


def clean_answer(s: str) -> str:
    """Strip what carries no meaning around an answer: whitespace, `$`/`\\(`/`\\[` wrappers, one trailing
    period, and a \\boxed{} that spans the whole answer; up to 8 nested layers of these."""
    for _ in range(8):  # wrappers can nest ("$\boxed{5}$."); each round peels one layer
        before = s
        s = s.strip()
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                break
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        m = _BOX_CMD.match(s)
        if m:
            found = _box_content(s, m.end(), _brace_pairs(s))
            if found is not None and found[1] == len(s):
                s = found[0]
        if s == before:
            break
    return s


def extract_answer(text: str) -> str | None:
    """The final answer in a completion or a reference solution, cleaned; None if there is none.

    Looks, in order, for: the last complete <answer>...</answer> (a boxed answer inside it is unboxed);
    the last \\boxed{...} / \\fbox{...}; GSM8K's "#### N"; the last plain number (an integer, decimal or
    fraction such as 3/4, with thousands commas and a leading minus).
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer takes a string, got {type(text).__name__}")
    tagged = parse_completion(text).answer
    if tagged is not None:
        inner = last_boxed(tagged)
        answer = clean_answer(inner if inner is not None else tagged)
        return answer or None
    for find in (last_boxed, _last_gsm8k, _last_number):
        found = find(text)
        if found is not None:
            return clean_answer(found) or None
    return None


def _last_gsm8k(text: str) -> str | None:
    matches = _GSM8K.findall(text)
    return matches[-1].strip() if matches else None


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last.group(0) if last else None


# ----------------------------------------------------------------------------- numbers

_LATEX_SPACES = re.compile(r"\\[!,;: ]|\{,\}")  # MATH writes 10,\!000 and 10{,}000
_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{(\d+)\}")
_INT = re.compile(r"[+-]?\d+")


def _number_text(s: str) -> str:
    """A candidate number's text, normalised: wrappers, LaTeX spacing, currency `$`, unicode minus."""
    s = clean_answer(s)
    s = _LATEX_SPACES.sub(lambda m: "," if m.group(0) == "{,}" else "", s).replace("\u2212", "-")
    s = re.sub(r"^\\?\$", "", s).strip()  # a leading currency sign: "$18", "\$18"
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s.replace(" ", "")


def parse_number(s: str) -> Fraction | None:
    """The exact value of an integer, decimal, a/b or \\frac{a}{b} answer; None if `s` is not one
    (or longer than MAX_NUMBER_CHARS). Commas are accepted only as thousands separators."""
    s = _number_text(s)
    if len(s) > MAX_NUMBER_CHARS:
        return None
    m = _FRAC.fullmatch(s)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        den = int(m.group(3))
        return sign * Fraction(int(m.group(2)), den) if den else None
    if not _PLAIN.fullmatch(s):
        return None
    num, _, den = s.partition("/")
    if den and int(den) == 0:
        return None
    return Fraction(num) / (Fraction(den) if den else 1)


# ----------------------------------------------------------------------------- graders


def _no_answer(pred: str | None) -> Verdict | None:
    if pred is None or not pred.strip():
        return Verdict(False, "no answer", None)
    return None


def grade_exact(pred: str | None, problem: Problem) -> Verdict:
    """String equality after stripping surrounding whitespace."""
    verdict = _no_answer(pred)
    if verdict:
        return verdict
    ok = pred.strip() == problem.answer.strip()
    return Verdict(ok, "correct" if ok else "wrong value", pred)


def _gold_number(problem: Problem) -> Fraction:
    gold = parse_number(problem.answer)
    if gold is None:
        raise R1KitError(
            f"problem {problem.id!r}: answer_style 'numeric' but its answer {problem.answer!r} is not a number"
        )
    return gold


def grade_numeric(pred: str | None, problem: Problem) -> Verdict:
    """Exact equality of values: "1,234" == "1234" == "+1234.0"; "3/4" == "0.75" == "\\frac{3}{4}"."""
    verdict = _no_answer(pred)
    if verdict:
        return verdict
    if _number_text(pred) == _number_text(problem.answer):
        return Verdict(True, "correct", pred)  # also settles huge identical numbers without parsing
    gold = _gold_number(problem)
    if len(pred) > MAX_NUMBER_CHARS + 64:
        return Verdict(False, "too long", pred)
    value = parse_number(pred)
    if value is None:
        return Verdict(False, "unparseable", pred)
    return Verdict(value == gold, "correct" if value == gold else "wrong value", pred)


def _math_fast(pred: str | None, gold: str) -> Verdict | None:
    """Settle a "math" answer without math-verify when that is safe; None means: ask math-verify.

    Equal text, or equal plain-number values, is correct. Two plain *integers* that differ are wrong, and so
    are two exact expressions (no decimals) whose values differ (`quick_math.plainly_different`).
    Anything else (decimals that may round, LaTeX, sets, intervals...) goes to math-verify.
    """
    verdict = _no_answer(pred)
    if verdict:
        return verdict
    pred = clean_answer(pred)
    gold = clean_answer(gold)
    if pred == gold:
        return Verdict(True, "correct", pred)
    if len(pred) > MAX_MATH_CHARS:
        return Verdict(False, "too long", pred)
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        if p == g:
            return Verdict(True, "correct", pred)
        if _INT.fullmatch(_number_text(pred)) and _INT.fullmatch(_number_text(gold)):
            return Verdict(False, "wrong value", pred)
    if plainly_different(pred, gold):  # exact expressions with different values (r1kit.rewards.quick_math)
        return Verdict(False, "wrong value", pred)
    return None


def grade_math(pred: str | None, problem: Problem, timeout_s: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """Mathematical equivalence (math-verify, hard time limit) after the cheap checks of `_math_fast`."""
    fast = _math_fast(pred, problem.answer)
    if fast is not None:
        return fast
    pred = clean_answer(pred)
    result = verify_math(pred, clean_answer(problem.answer), timeout_s)
    return Verdict(result.correct, result.reason, pred)


# --- countdown: a safe evaluator over Python's ast (never eval()) ---

_BINOPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
# Only these nodes may appear: no names, calls, attributes, powers, comparisons or float literals.
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.USub, ast.UAdd, *_BINOPS)
_SYMBOLS = {"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\\times": "*", "\\cdot": "*", "\\div": "/"}


def _countdown_expression(pred: str) -> str:
    """The expression part of an answer: "1+2 = 3" -> "1+2"; ×, ÷ and LaTeX operators made ASCII."""
    expr = clean_answer(pred).split("=")[0]
    for sym, ascii_op in _SYMBOLS.items():
        expr = expr.replace(sym, ascii_op)
    return expr.strip()


def _evaluate(node: ast.AST) -> Fraction:
    """Exact value of an expression tree already restricted to _ALLOWED_NODES (depth <= its length)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    return _BINOPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))


def _parse_countdown(expr: str) -> tuple[ast.AST | None, str]:
    """(tree, "") for a safe arithmetic expression over integer literals, else (None, reason)."""
    if len(expr) > MAX_COUNTDOWN_CHARS:
        return None, "too long"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None, "unparseable"
    for node in ast.walk(tree):  # iterative walk: no recursion limit to hit
        if not isinstance(node, _ALLOWED_NODES):
            return None, "disallowed syntax"
        if isinstance(node, ast.Constant) and type(node.value) is not int:
            return None, "disallowed syntax"
    return tree, ""


def _literals(tree: ast.AST) -> list[int]:
    return sorted(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant))


def _countdown_spec(problem: Problem) -> tuple[list[int], int]:
    nums = problem.meta.get("nums")
    if not isinstance(nums, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool) for n in nums):
        raise R1KitError(
            f"problem {problem.id!r}: answer_style 'countdown' needs meta['nums'] = a list of ints, got {nums!r}"
        )
    try:
        target = int(problem.answer)
    except ValueError:
        raise R1KitError(f"problem {problem.id!r}: countdown target {problem.answer!r} is not an integer") from None
    return sorted(nums), target


def grade_countdown(pred: str | None, problem: Problem) -> Verdict:
    """The expression uses each of meta["nums"] exactly once, only + - * / and parentheses (a unary minus
    is tolerated), and evaluates to int(answer) within 1e-6. Arithmetic is exact (Fraction); there is no
    power operator, and literals must be the given numbers, so values stay small."""
    verdict = _no_answer(pred)
    if verdict:
        return verdict
    nums, target = _countdown_spec(problem)
    tree, reason = _parse_countdown(_countdown_expression(pred))
    if tree is None:
        return Verdict(False, reason, pred)
    if _literals(tree) != nums:
        return Verdict(False, "numbers not used exactly once", pred)
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        return Verdict(False, "division by zero", pred)
    except RecursionError:  # thousands of stacked unary minus signs under the length cap cannot happen, but
        return Verdict(False, "unparseable", pred)
    ok = abs(value - target) <= Fraction(1, 10**6)
    return Verdict(ok, "correct" if ok else "wrong value", pred)


GRADERS: dict[str, Callable[[str | None, Problem], Verdict]] = {
    "exact": grade_exact,
    "numeric": grade_numeric,
    "math": grade_math,
    "countdown": grade_countdown,
}


def _grade_code(pred: str | None, problem: Problem) -> Verdict:
    from r1kit.rewards.code import grade_code  # the sandbox is started only when code is graded

    return grade_code(pred, problem)


GRADERS["code"] = _grade_code


def extract_for(text: str, problem: Problem) -> str | None:
    """What evaluation grades: the program for "code" problems (r1kit.rewards.code.extract_program), else
    the final answer (`extract_answer`)."""
    if problem.answer_style == "code":
        from r1kit.rewards.code import extract_program

        return extract_program(text)
    return extract_answer(text)


def grader_for(answer_style: str) -> Callable[[str | None, Problem], Verdict]:
    try:
        return GRADERS[answer_style]
    except KeyError:
        raise R1KitError(f"unknown answer_style {answer_style!r}; known styles: {sorted(GRADERS)}") from None


def grade(text_or_answer: str, problem: Problem, *, extract: bool = True) -> Verdict:
    """Grade a completion (extract=True: find its final answer first) or an already-extracted answer."""
    pred = extract_answer(text_or_answer) if extract else text_or_answer
    return grader_for(problem.answer_style)(pred, problem)


def grade_many(
    preds: Sequence[str | None], problems: Sequence[Problem], timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[Verdict]:
    """`GRADERS[style](pred, problem)` for each pair; the "math" ones that need math-verify are verified
    together, in parallel over the worker pool, instead of one after another."""
    if len(preds) != len(problems):
        raise ValueError(f"{len(preds)} answers for {len(problems)} problems")
    verdicts: list[Verdict | None] = [None] * len(preds)
    pending: list[int] = []
    code = [i for i, p in enumerate(problems) if p.answer_style == "code"]
    if code:  # programs run concurrently in the sandbox pool
        from r1kit.rewards.code import grade_code_many

        for i, v in zip(code, grade_code_many([preds[i] for i in code], [problems[i] for i in code])):
            verdicts[i] = v
    for i, (pred, problem) in enumerate(zip(preds, problems)):
        if verdicts[i] is not None:
            continue
        if problem.answer_style == "math":
            verdicts[i] = _math_fast(pred, problem.answer)
            if verdicts[i] is None:
                pending.append(i)
        else:
            verdicts[i] = grader_for(problem.answer_style)(pred, problem)
    pairs = [(clean_answer(preds[i]), clean_answer(problems[i].answer)) for i in pending]
    for i, (pair, result) in zip(pending, zip(pairs, verify_math_many(pairs, timeout_s))):
        verdicts[i] = Verdict(result.correct, result.reason, pair[0])
    return verdicts  # type: ignore[return-value]  # every slot is filled above


# ----------------------------------------------------------------------------- cons@k grouping


def _countdown_key(answer: str) -> tuple[Fraction, list[int]] | None:
    tree, _ = _parse_countdown(_countdown_expression(answer))
    if tree is None:
        return None
    try:
        return _evaluate(tree), _literals(tree)
    except (ZeroDivisionError, RecursionError):
        return None


def _same_number(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and x == y


def _same_countdown(a: str, b: str) -> bool:
    ka, kb = _countdown_key(a), _countdown_key(b)
    return ka is not None and ka == kb


def _same_math(a: str, b: str) -> bool:
    fast = _math_fast(b, a)  # `a` plays the reference
    if fast is not None:
        return fast.correct
    return verify_math(clean_answer(b), clean_answer(a)).correct


# How two *answers* (rather than an answer and a reference) are compared, per answer_style.
_EQUIVALENT: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda a, b: False,  # equal text was already checked
    "numeric": _same_number,
    "countdown": _same_countdown,
    "math": _same_math,
    "code": lambda a, b: False,  # programs vote together only when their text is the same
}


def answers_equivalent(a: str, b: str, answer_style: str) -> bool:
    """Whether two extracted answers fall in one cons@k voting group, by the verifier's own equivalence:
    "1/2", "0.5" and "\\frac{1}{2}" are one group under "math" and "numeric". Under "countdown", two
    expressions are one group when they use the same numbers and have the same value."""
    grader_for(answer_style)  # unknown style -> R1KitError naming the known ones
    if a.strip() == b.strip():
        return True
    if not a.strip() or not b.strip():
        return False
    return _EQUIVALENT[answer_style](a, b)
