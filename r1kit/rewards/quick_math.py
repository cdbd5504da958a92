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

_TOKEN = re.compile(r"\s*(\\left\(|\\right\)|\\[dt]?frac|\\sqrt|\\cdot|\\times|\d+|[a-zA-Z]|[-+*/^(){}])")
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
        fn = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times", "/"):
                self.take()
                rhs, lhs = self.unary(), fn
                fn = (lambda a, b: lambda e: a(e) / _nonzero(b(e)))(lhs, rhs) if tok == "/" else \
                    (lambda a, b: lambda e: a(e) * b(e))(lhs, rhs)
            elif tok is not None and (tok in ("(", "{", "\\left(", "\\frac", "\\dfrac", "\\tfrac", "\\sqrt") or tok.isalpha()):
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
    """(evaluator, variables) for an answer inside the subset, else None."""
    if len(text) > MAX_CHARS or "." in text:
        return None
    try:
        parser = _Parser(_tokens(text))
        if not parser.t:
            return None
        fn = parser.expr()
        if parser.peek() is not None:
            return None
    except (_Reject, RecursionError):
        return None
    return fn, frozenset(parser.variables)


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


def plainly_different(pred: str, gold: str) -> bool:
    """True only when both answers are exact expressions in the subset, over the same variables, whose values
    differ (relative 1e-6) at a sample point: then no reading of them makes them equal. False means: unknown."""
    p, g = compile_expression(pred), compile_expression(gold)
    if p is None or g is None or p[1] != g[1]:
        return False
    pv, gv = _values(*p), _values(*g)
    if pv is None or gv is None:
        return False
    return any(abs(a - b) > REL_TOL * max(1.0, abs(a), abs(b)) for a, b in zip(pv, gv))
