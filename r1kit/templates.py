"""Prompt templates and the <think>/<answer> completion parser.

The R1-Zero template (DeepSeek-R1 paper, Table 1) is a plain User/Assistant conversation that tells the
model to reason inside <think> </think> and answer inside <answer> </answer>; the wording below is ours.
The prompt ends right after "Assistant:", so the model itself must open <think>: that first choice is
part of what the format reward teaches.

`parse_completion` never raises: it reports what it found (missing, repeated, nested or unclosed tags)
so that rewards and evaluation can decide what to do with malformed output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SPECIAL_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

R1_ZERO_TEMPLATE = (
    "User and Assistant talk. The Assistant first thinks in <think> </think>, "
    "then answers in <answer> </answer>.\nUser: {question}\nAssistant:"
)

TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "plain": "{question}\n"}
# "chat": the model's own chat template (tokenizer.apply_chat_template), the R1-Zero instruction as the system turn
CHAT_SYSTEM = ("The Assistant first thinks in <think> </think>, then answers in <answer> </answer>.")


def render_prompt(question: str, template: str = "r1_zero", tokenizer=None) -> str:
    """The text the policy continues. `template` is a TEMPLATES name, a format string with {question}, or
    "chat": the tokenizer's own chat template (system instruction + user question + generation prompt)."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs the model's tokenizer with a chat template")
        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fmt = TEMPLATES.get(template, template)
    if "{question}" not in fmt:
        raise ValueError(f"template {template!r} is neither a known name {sorted(TEMPLATES)} nor contains {{question}}")
    return fmt.replace("{question}", question)


@dataclass(frozen=True)
class ParsedCompletion:
    think: str | None  # text inside the first <think>...</think> (None if absent)
    answer: str | None  # text inside the last complete <answer>...</answer> (None if absent)
    well_formed: bool  # exactly "<think> ... </think> <answer> ... </answer>" with nothing else around
    problems: tuple[str, ...]  # what was wrong, for logs and rejection reasons


_WELL_FORMED = re.compile(
    r"^\s*<think>((?:(?!<think>|</think>|<answer>|</answer>).)*)</think>\s*"
    r"<answer>((?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>\s*$",
    re.DOTALL,
)
_ANSWER = re.compile(r"<answer>((?:(?!<answer>|</answer>).)*)</answer>", re.DOTALL)


def parse_completion(text: str) -> ParsedCompletion:
    """Split a completion into its reasoning and its answer, robust to malformed tags.

    The answer is the content of the *last* complete, non-nested <answer>...</answer> pair, so a model
    that restates its answer is graded on its final word; nested or unclosed answers give None.
    """
    m = _WELL_FORMED.match(text)
    if m:
        return ParsedCompletion(m.group(1).strip(), m.group(2).strip(), True, ())
    problems: list[str] = []
    for tag in SPECIAL_TAGS:
        n = text.count(tag)
        if n == 0:
            problems.append(f"missing {tag}")
        elif n > 1:
            problems.append(f"repeated {tag}")
    answers = _ANSWER.findall(text)
    answer = answers[-1].strip() if answers else None
    if answer is not None and any(t in answer for t in SPECIAL_TAGS):
        answer, problems = None, problems + ["nested tags in answer"]
    think = None
    start = text.find(THINK_OPEN)
    if start >= 0:
        end = text.find(THINK_CLOSE, start)
        if end >= 0:
            think = text[start + len(THINK_OPEN) : end].strip()
        else:
            problems.append(f"unclosed {THINK_OPEN}")
    if not problems:
        problems.append("text outside or between the tags")
    return ParsedCompletion(think, answer, False, tuple(problems))
