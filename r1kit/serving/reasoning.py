"""Token ids -> text deltas -> (reasoning, answer) deltas, one sample at a time, for streaming replies.

Three small state machines, chained per sample by `SampleText`:
1. `IncrementalDetokenizer`: token ids in, new text out. It decodes a short window (a few ids of context
   plus the new ones) instead of the whole sequence, and holds back text that ends in an incomplete UTF-8
   character (U+FFFD), as vLLM and TGI do.
2. `StopMatcher`: the OpenAI `stop` strings. Text that might be the start of a stop string is held back
   until it is known not to be; a match cuts the text before the stop string (not included, as OpenAI).
3. `ReasoningSplitter`: splits the text at the template's reasoning/answer boundary.
   - r1kit's template: "<think> R </think> <answer> A </answer>" -> reasoning "R", content "A"
     (the four tags are removed, text around them kept: nothing the model wrote is lost);
   - a chat template whose generation prompt already opens <think> (DeepSeek-R1-Distill, QwQ): the
     reply starts inside the reasoning, and `</think>` ends it;
   - a reply that does not start with <think> (after whitespace): everything is content.
   `<answer>` inside the reasoning also ends it (the model skipped `</think>`). Whitespace at the start and
   end of each part is dropped, in streaming too (trailing whitespace is held back until more text follows),
   so the streamed deltas concatenate to exactly the non-streamed strings.

Streamed and non-streamed replies go through the same code: the non-streamed reply is the concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from r1kit.templates import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

_CONTEXT_IDS = 5  # ids of left context decoded with each new token (leading-space tokenizers need some)
_MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens


class IncrementalDetokenizer:
    """Decode a growing list of token ids into text deltas; `offsets[k]` = len(text) after k+1 tokens."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        # The tokenizer's special ids (EOS, pad, BOS) are dropped; tags such as <think> are kept as text even
        # where the backend marks them special (skip_special_tokens=True would drop them there).
        self.skip = frozenset(tokenizer.all_special_ids)
        self.ids: list[int] = list((prompt_ids or [])[-_CONTEXT_IDS:])
        self.prefix_offset = 0  # window start (context for the decoder)
        self.read_offset = len(self.ids)  # ids before this are already in `text`
        self.text = ""
        self.offsets: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in self.skip], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int]) -> str:
        """Add new token ids; return the text they complete (possibly '')."""
        delta = []
        for t in token_ids:
            if int(t) in self.skip:
                self.offsets.append(len(self.text))
                continue
            self.ids.append(int(t))
            delta.append(self._advance(final=False))
            self.offsets.append(len(self.text))
        return "".join(delta)

    def flush(self) -> str:
        """The sample ended: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        out = self._advance(final=True)
        if self.offsets:
            self.offsets[-1] = len(self.text)
        return out

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        # A trailing U+FFFD is held back while it may be a multi-byte character still arriving (at most 4
        # byte tokens); past that it is an invalid byte and goes out as U+FFFD, as a full decode shows it.
        pending = len(self.ids) - self.read_offset
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and pending < _MAX_CHAR_TOKENS and not final):
            return ""
        new = full[len(prefix):] if full.startswith(prefix) else self._decode(self.ids[self.read_offset:])
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new


class StopMatcher:
    """Find OpenAI `stop` strings in streamed text; release only text that cannot start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything seen
        self.released = 0  # text[:released] was handed on
        self.stopped = False

    def push(self, delta: str) -> str:
        """Feed new text; return what can be released now. After a stop string, returns '' forever."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        longest = max(len(s) for s in self.stops)
        window_start = max(0, self.released - longest + 1)
        hits = [p for p in (self.text.find(s, window_start) for s in self.stops) if p >= 0]
        if hits:
            self.stopped = True
            cut = max(min(hits), self.released)
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(len(self.text) - _held_suffix(self.text, self.stops, self.released))

    def flush(self) -> str:
        """The sample ended (EOS or length): release whatever was held back."""
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.released:upto]
        self.released = max(self.released, upto)
        return out


def _held_suffix(text: str, tags, start: int = 0) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text) - start), best, -1):
            if tag.startswith(text[len(text) - k:]):
                best = k
                break
    return best


_START, _REASONING, _CONTENT = "start", "reasoning", "content"


@dataclass
class SplitDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    """Stream-split text into reasoning and content (see the module docstring).

    `boundary` is the position in the raw text where the reasoning ended (None while in it or when
    there was none); `had_reasoning` whether the reply had a reasoning part at all.
    """

    def __init__(self, starts_in_reasoning: bool = False):
        self.mode = _REASONING if starts_in_reasoning else _START
        self.had_reasoning = starts_in_reasoning
        self.buf = ""  # raw text not yet classified
        self.consumed = 0  # raw characters before buf
        self.boundary: int | None = None
        self._fresh = True  # at the start of a part: leading whitespace is dropped
        self._ws = ""  # trailing whitespace held back within the current part

    def push(self, text: str, final: bool = False) -> SplitDelta:
        self.buf += text
        out = SplitDelta()
        while self.buf:
            if not self._step(out, final):
                break
        if final:
            self._ws = ""
        return out

    def _step(self, out: SplitDelta, final: bool) -> bool:
        """Consume a piece of buf; False when the rest must wait for more text."""
        if self.mode == _START:
            stripped = self.buf.lstrip()
            if not stripped or (THINK_OPEN.startswith(stripped) and not final):
                return False
            if stripped.startswith(THINK_OPEN):
                self._advance(len(self.buf) - len(stripped) + len(THINK_OPEN))
                self.mode, self.had_reasoning = _REASONING, True
            else:
                self.mode = _CONTENT
            return True
        tags = (THINK_CLOSE, ANSWER_OPEN) if self.mode == _REASONING else (ANSWER_OPEN, ANSWER_CLOSE)
        hits = [(p, t) for p, t in ((self.buf.find(t), t) for t in tags) if p >= 0]
        if hits:
            p, tag = min(hits)
            self._emit(out, self.buf[:p])
            self._advance(p)
            if self.mode == _REASONING:
                self.boundary = self.consumed + (len(tag) if tag == THINK_CLOSE else 0)
                self.mode, self._fresh, self._ws = _CONTENT, True, ""
            self._advance(len(tag))
            return True
        keep = 0 if final else _held_suffix(self.buf, tags)
        self._emit(out, self.buf[:len(self.buf) - keep])
        self._advance(len(self.buf) - keep)
        return False

    def _advance(self, n: int) -> None:
        self.consumed += n
        self.buf = self.buf[n:]

    def _emit(self, out: SplitDelta, text: str) -> None:
        """Send text to the current part, dropping its leading and (held) trailing whitespace."""
        if self._fresh:
            text = text.lstrip()
            if not text:
                return
            self._fresh = False
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        piece, self._ws = self._ws + body, text[len(body):]
        if self.mode == _REASONING:
            out.reasoning += piece
        else:
            out.content += piece


@dataclass
class SampleText:
    """One sample's text pipeline: ids -> detokenizer -> stop strings -> reasoning split."""

    detok: IncrementalDetokenizer
    stops: StopMatcher
    splitter: ReasoningSplitter | None  # None: raw text (the completions endpoint)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    num_tokens: int = 0

    def push(self, token_ids: list[int], finished: bool) -> SplitDelta:
        """Feed a step's tokens; return the new (reasoning, content) text to send."""
        self.num_tokens += len(token_ids)
        text = self.detok.push(token_ids)
        if finished:
            text += self.detok.flush()
        raw = self.stops.push(text)
        final = finished or self.stops.stopped
        if final:
            raw += self.stops.flush()
        if self.splitter is None:
            delta = SplitDelta(content=raw)
        else:
            delta = self.splitter.push(raw, final=final)
        self.reasoning.append(delta.reasoning)
        self.content.append(delta.content)
        return delta

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def reasoning_tokens(self) -> int:
        """Completion tokens up to the end of the reasoning (the tag that closed it included)."""
        sp = self.splitter
        if sp is None or not sp.had_reasoning:
            return 0
        if sp.boundary is None:
            return self.num_tokens
        return next((k + 1 for k, off in enumerate(self.detok.offsets) if off >= sp.boundary), self.num_tokens)
