"""A cheap disproof for math answers: two exact expressions with different values are different answers.

Most wrong answers an RL policy writes are plainly wrong (`17` for `2\\sqrt{3}`, `x^{2}+3x+7` for `x^{2}+1`),
yet each one costs math-verify a sympy parse and comparison (tens of ms, and the tail is what a GRPO step
waits for). This module parses a strict LaTeX subset (integers, one-letter variables, + - * / ^, `\\frac`,
`\\sqrt`, brackets, implicit products such as `3x` or `2\\sqrt{3}`) into a float evaluator and compares the two
answers at a few fixed points. It only ever says "different": values that differ by more than 1e-6 relative,
for expressions with no decimals (no rounding question) and the same variables, cannot be equal, whatever
math-verify's rules are. Everything else (agreement, anything outside the subset) goes to math-verify.
"""
from __future__ import annotations

import math
import re
from typing import Callable

MAX_CHARS = 200  # longer answers are left to math-verify (after its own static checks)
MAX_DIGITS = 30
MAX_EXPONENT = 64
REL_TOL = 1e-6
# Sample values per variable: irrational-looking, distinct per letter, away from poles of typical answers.
_POINTS = ((0.7390851332, 1.3247179572), (1.6180339887, 0.5772156649), (2.7182818459, 1.4142135623))

_TOKEN = re.compile(r"\s*(\\left\(|\\right\)|\\[dt]?frac|\\sqrt|\\cdot|\\times|\d+|[a-zA-Z]|[-+*/^(){},])")
_NOT_VARIABLES = {"e", "i"}  # constants in math-verify's reading, not variables: outside the subset

Env = dict[str, float]
Fn = Callable[[Env], float]


class _Reject(Exception):
    """The text is outside the subset, or its value is not a finite real at a sample point."""


def _tokens(s: str) -> list[str]:
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            if s[pos:].strip() == "":
                break
            raise _Reject
        out.append(m.group(1))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.t, self.i, self.variables = tokens, 0, set()

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _Reject
        self.i += 1
        return tok

    def expr(self) -> Fn:
        fn = self.term()
        while self.peek() in ("+", "-"):
            op, rhs, lhs = self.take(), self.term(), fn
            fn = (lambda a, b: lambda e: a(e) + b(e))(lhs, rhs) if op == "+" else (lambda a, b: lambda e: a(e) - b(e))(lhs, rhs)
        return fn

    def term(self) -> Fn:
        fn, divided = self.unary(), False
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times", "/"):
                self.take()
                divided = tok == "/"
                rhs, lhs = self.unary(), fn
                fn = (lambda a, b: lambda e: a(e) / _nonzero(b(e)))(lhs, rhs) if tok == "/" else \
                    (lambda a, b: lambda e: a(e) * b(e))(lhs, rhs)
            elif tok is not None and (tok in ("(", "{", "\\left(", "\\frac", "\\dfrac", "\\tfrac", "\\sqrt") or tok.isalpha()):
                if divided or tok in ("\\frac", "\\dfrac", "\\tfrac"):
                    raise _Reject  # readers differ: 1/2x is (1/2)x or 1/(2x); 3\frac{1}{2} is a mixed number
                rhs, lhs = self.power(), fn  # implicit product: 3x, 2\sqrt{3}, x(x+1)
                fn = (lambda a, b: lambda e: a(e) * b(e))(lhs, rhs)
            else:
                return fn

    def unary(self) -> Fn:
        if self.peek() in ("+", "-"):
            sign = self.take()
            inner = self.unary()
            return inner if sign == "+" else (lambda a: lambda e: -a(e))(inner)
        return self.power()

    def power(self) -> Fn:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        tok = self.peek()
        if tok == "{":
            self.take()
            exponent = self.expr()
            self.take("}")
        elif tok is not None and tok.isdigit() and len(tok) == 1:  # x^2: one digit, as LaTeX reads it
            self.take()
            exponent = (lambda v: lambda e: v)(float(tok))
        else:
            raise _Reject
        return (lambda a, b: lambda e: _pow(a(e), b(e)))(base, exponent)

    def atom(self) -> Fn:
        tok = self.take()
        if tok.isdigit():
            if len(tok) > MAX_DIGITS:
                raise _Reject
            return (lambda v: lambda e: v)(float(int(tok)))
        if tok.isalpha() and len(tok) == 1:
            if tok in _NOT_VARIABLES:
                raise _Reject
            self.variables.add(tok)
            return lambda e: e[tok]
        if tok in ("(", "{", "\\left("):
            inner = self.expr()
            self.take({"(": ")", "{": "}", "\\left(": "\\right)"}[tok])
            return inner
        if tok in ("\\frac", "\\dfrac", "\\tfrac"):
            num, den = self.group(), self.group()
            return (lambda a, b: lambda e: a(e) / _nonzero(b(e)))(num, den)
        if tok == "\\sqrt":
            inner = self.group()
            return (lambda a: lambda e: math.sqrt(_nonnegative(a(e))))(inner)
        raise _Reject

    def group(self) -> Fn:
        self.take("{")
        inner = self.expr()
        self.take("}")
        return inner


def _nonzero(v: float) -> float:
    if v == 0:
        raise _Reject
    return v


def _nonnegative(v: float) -> float:
    if v < 0:
        raise _Reject
    return v


def _pow(base: float, exponent: float) -> float:
    if exponent != int(exponent) or abs(exponent) > MAX_EXPONENT or (base == 0 and exponent < 0):
        raise _Reject  # fractional powers (branches) and huge ones are math-verify's
    return base ** int(exponent)


def compile_expression(text: str) -> tuple[Fn, frozenset[str]] | None:
    """(evaluator, variables) for a single expression inside the subset, else None."""
    compiled = compile_answer(text)
    if compiled is None or len(compiled[0]) != 1:
        return None
    return compiled[0][0], compiled[1]


def _split_tuple(tokens: list[str]) -> list[list[str]] | None:
    """`( a, b, ... )` -> its top-level parts (2 or more), else None."""
    if len(tokens) < 2 or (tokens[0], tokens[-1]) not in (("(", ")"), ("\\left(", "\\right)")):
        return None
    parts, depth, cur = [], 0, []
    for tok in tokens[1:-1]:
        depth += tok in ("(", "{", "\\left(")
        depth -= tok in (")", "}", "\\right)")
        if depth < 0:
            return None  # "(1)+(2)": the outer brackets are not one group
        if tok == "," and depth == 0:
            parts.append(cur)
            cur = []
        else:
            cur.append(tok)
    parts.append(cur)
    return parts if len(parts) >= 2 else None


def _compile_tokens(tokens: list[str], variables: set[str]) -> Fn:
    if "," in tokens or not tokens:
        raise _Reject
    if len(tokens) == 1 and tokens[0].isdigit() and len(tokens[0]) > 1 and tokens[0][0] == "0":
        raise _Reject  # "007", or the "000" of "(1, 000)": a thousands group, not a number
    parser = _Parser(tokens)
    fn = parser.expr()
    if parser.peek() is not None:
        raise _Reject
    variables |= parser.variables
    return fn


def compile_answer(text: str) -> tuple[list[Fn], frozenset[str]] | None:
    """(evaluators, variables): one evaluator for an expression, one per part for a tuple `(a, b)`; None
    outside the subset."""
    if len(text) > MAX_CHARS or "." in text:
        return None
    variables: set[str] = set()
    try:
        tokens = _tokens(text)
        parts = _split_tuple(tokens)
        fns = [_compile_tokens(part, variables) for part in (parts or [tokens])]
    except (_Reject, RecursionError):
        return None
    return fns, frozenset(variables)


def _values(fn: Fn, variables: frozenset[str]) -> list[float] | None:
    out = []
    for point in _POINTS:
        env = {v: point[k % 2] + 0.1 * k for k, v in enumerate(sorted(variables))}
        try:
            value = fn(env)
        except (_Reject, OverflowError, ZeroDivisionError, ValueError):
            return None
        if not math.isfinite(value):
            return None
        out.append(value)
    return out


def _differ(a: float, b: float) -> bool:
    return abs(a - b) > REL_TOL * max(1.0, abs(a), abs(b))


def plainly_different(pred: str, gold: str) -> bool:
    """True only when no reading of the two answers makes them equal; False means: unknown (ask math-verify).

    Decided: two expressions over the same variables whose values differ (relative 1e-6) at a sample point;
    a constant against an expression whose value changes with its variables; tuples of constants of different
    lengths (a scalar is a 1-tuple), or whose sorted values differ (so neither as ordered pairs nor as sets
    of solutions are they equal). Tuples with variables and expressions over different variables are not.
    """
    p, g = compile_answer(pred), compile_answer(gold)
    if p is None or g is None:
        return False
    (pf, pvars), (gf, gvars) = p, g
    if len(pf) > 1 or len(gf) > 1:
        if pvars or gvars:
            return False
        pv, gv = [_values(f, pvars) for f in pf], [_values(f, gvars) for f in gf]
        if any(v is None for v in pv + gv):
            return False
        if len(pf) != len(gf):
            return True
        return any(_differ(a, b) for a, b in zip(sorted(v[0] for v in pv), sorted(v[0] for v in gv)))
    pv, gv = _values(pf[0], pvars), _values(gf[0], gvars)
    if pv is None or gv is None:
        return False
    if pvars == gvars:
        return any(_differ(a, b) for a, b in zip(pv, gv))
    if not pvars or not gvars:  # a constant against an expression that is not constant
        varying = gv if gvars else pv
        return any(_differ(varying[0], v) for v in varying[1:])
    return False
