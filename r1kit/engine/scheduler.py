"""Request bookkeeping for the local engine: the waiting queue, admission, and the running batch's rows.

A `Request` is one prompt with its SamplingParams; its n samples are n rows of the running `Batch`
(they share the prompt's prefill and prompt-cache slot). `Scheduler` keeps requests waiting in arrival
order and admits them, oldest first, while the running samples stay within `max_num_seqs` (a request that
does not fit blocks the ones behind it, so a large n is never starved). The engine (r1kit/engine/local.py)
drives one step at a time: decode the running rows, admit and prefill waiting requests into the same
batch (continuous batching), sample every row with its own request's parameters, and retire finished rows.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from r1kit.engine.api import SamplingParams

UNIFORM_BLOCK = 32  # uniforms a seeded request draws from its generator at a time


@dataclass(eq=False)
class Request:
    """One prompt being served: its n samples, how each finished, and what it holds in the prefix cache."""

    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # None: torch's global RNG
    backend: str  # "fast" or "hf": the forward that serves it
    draw_finished: bool = False  # generate(): a finished row keeps drawing until compacted (the original order)
    use_cache: bool = True  # look the prompt up in / store it into the prefix cache
    first_sid: int = 0  # generate(): output row of sample 0 (samples are rows first_sid .. first_sid + n - 1)
    live: int = 0  # samples still generating
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    blocks: list = field(default_factory=list)  # prefix-cache blocks this request holds a reference on
    cache_epoch: int = -1  # the prefix cache's epoch (weights version) when it was prefilled
    finish: list = field(default_factory=list)  # per sample: None while running, then a FINISH_REASON
    tokens: list = field(default_factory=list)  # per sample: generated ids (kept when completions are cached)
    aborted: bool = False

    def __post_init__(self):
        self.live = self.params.n
        self.finish = [None] * self.params.n
        self.tokens = [[] for _ in range(self.params.n)]
        self._uniforms: list[float] = []  # drawn ahead from `generator` (add_request's sampling)
        self._u_at = 0

    def uniforms(self, k: int) -> list[float]:
        """The next k uniforms of this request's own generator, drawn ahead in blocks (one torch.rand per
        block instead of one per step). A CPU generator's stream does not depend on how it is split into
        calls, so these are the values k draws now would give (tests/test_engine_requests.py checks it)."""
        if self._u_at + k > len(self._uniforms):
            block = max(k, UNIFORM_BLOCK)
            drawn = torch.rand((block, 1), generator=self.generator).squeeze(1).tolist()
            self._uniforms = self._uniforms[self._u_at:] + drawn
            self._u_at = 0
        out = self._uniforms[self._u_at:self._u_at + k]
        self._u_at += k
        return out

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.params.stop_token_ids)

    def shares_draws_with(self, other: Request) -> bool:
        """Its rows, finished or not, draw with `other`'s from one generator at one temperature and top-p."""
        return (self.draw_finished and other.draw_finished and self.generator is other.generator
                and self.params.temperature == other.params.temperature and self.params.top_p == other.params.top_p)


class Batch:
    """The running rows (one per sample) and their per-row state, as tensors the step works on.

    rows[i] = (request, sample index); row tensors are [B]: `length` tokens generated so far (while every
    row has the same length, the int `t` instead: one op less per step), `max_len`
    the request's max_tokens, `live` still generating (a finished row stays until the next compaction),
    `last` the token sampled last (fed at the next decode), `last_pos` (prompt length - 1), `eos` (EOS ends
    the row) and `stops` [B, S] extra stop ids (-1 padded; None when no row has any).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.clear()

    def clear(self) -> None:
        dev = self.device
        self.rows: list[tuple[Request, int]] = []
        self.requests: list[Request] = []  # the distinct requests of `rows`, in row order
        self.aborted = False  # a request's rows were aborted: compact them away at the next step
        self.t: int | None = None  # tokens every row has generated, while all rows joined together
        self.length = torch.zeros(0, dtype=torch.long, device=dev)  # per row, when t is None
        self.min_max_len = 0
        self.max_len = torch.zeros(0, dtype=torch.long, device=dev)
        self.last_pos = torch.zeros(0, dtype=torch.long, device=dev)  # prompt length - 1
        self.last = torch.zeros(0, dtype=torch.long, device=dev)
        self.live = torch.zeros(0, dtype=torch.bool, device=dev)
        self.eos = torch.zeros(0, dtype=torch.bool, device=dev)
        self.sid = torch.zeros(0, dtype=torch.long, device=dev)
        self.stops: torch.Tensor | None = None
        self.all_eos = True  # every row ends at an EOS (no ignore_eos): the `eos` mask is all True
        self.backend = ""
        self.n_live = 0
        self._groups = self._plan = None

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, requests: list[Request]) -> None:
        """New rows at the end, in request order (request-major, sample-minor)."""
        dev, new = self.device, [(r, i) for r in requests for i in range(r.params.n)]

        def col(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=dev)

        if not self.rows:
            self.t = 0
        elif self.t:  # rows at different lengths from now on: per-row lengths
            self.length, self.t = torch.full((len(self.rows),), self.t, dtype=torch.long, device=dev), None
        if self.t is None:
            self.length = torch.cat((self.length, col([0] * len(new))))
        self.max_len = torch.cat((self.max_len, col([r.params.max_tokens for r, _ in new])))
        self.last_pos = torch.cat((self.last_pos, col([len(r.prompt) - 1 for r, _ in new])))
        self.last = torch.cat((self.last, col([0] * len(new))))
        self.live = torch.cat((self.live, col([True] * len(new), torch.bool)))
        self.eos = torch.cat((self.eos, col([not r.params.ignore_eos for r, _ in new], torch.bool)))
        self.sid = torch.cat((self.sid, col([r.first_sid + i for r, i in new])))
        width = max([len(r.stop_ids) for r, _ in self.rows + new] + [0])
        if width:
            stops = [list(r.stop_ids) + [-1] * (width - len(r.stop_ids)) for r, _ in self.rows + new]
            self.stops = col(stops)
        self.rows += new
        self.requests = list(dict.fromkeys(r for r, _ in self.rows))
        self.min_max_len = min(r.params.max_tokens for r, _ in self.rows)
        self.n_live += len(new)
        self.all_eos = all(not r.params.ignore_eos for r, _ in self.rows)
        self._groups = self._plan = None

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only rows `idx` [b] (ascending)."""
        keep = idx.tolist()
        for name in ("max_len", "last_pos", "last", "live", "eos", "sid"):
            setattr(self, name, getattr(self, name)[idx])
        if self.stops is not None:
            self.stops = self.stops[idx]
        self.rows = [self.rows[i] for i in keep]
        self.requests = list(dict.fromkeys(r for r, _ in self.rows))
        self.min_max_len = min((r.params.max_tokens for r, _ in self.rows), default=0)
        if self.t is None:
            self.length = self.length[idx]
            if len(keep) and int(self.length.min()) == int(self.length.max()):
                self.t = int(self.length[0])  # the survivors are level again
        self._groups = self._plan = None

    def retire(self, row: int) -> None:
        """Row `row` finished or was aborted: it no longer draws (unless its request draws while finished)."""
        self.n_live -= 1
        req = self.rows[row][0]
        if not req.draw_finished:
            self._groups = self._plan = None

    def groups(self) -> list[tuple[torch.Generator | None, float, float, torch.Tensor | None]]:
        """Rows that draw this step, grouped by (generator, temperature, top_p), in row order.

        A request with a seed has its own generator, so its draws depend on nothing else in the batch.
        Rows of one group draw one uniform each, in row order; idx is None when the group is every row.
        """
        if self._groups is None and self.rows and all(r.shares_draws_with(self.rows[0][0]) for r in self.requests):
            req = self.rows[0][0]  # one generate() call: every row in one group
            self._groups = [(req.generator, req.params.temperature, req.params.top_p, None)]
        if self._groups is None:
            keyed: dict = {}
            for i, (req, k) in enumerate(self.rows):
                if req.finish[k] is not None and not req.draw_finished:
                    continue
                p = req.params
                key = (id(req.generator) if req.generator is not None else None, p.temperature, p.top_p)
                keyed.setdefault(key, (req.generator, p.temperature, p.top_p, []))[3].append(i)
            everyone = list(range(len(self.rows)))
            self._groups = [
                (g, t, tp, None if rows == everyone else torch.tensor(rows, dtype=torch.long, device=self.device))
                for g, t, tp, rows in keyed.values()
            ]
        return self._groups


    def plan(self) -> SimpleNamespace:
        """add_request's sampling of this step, every row in one `sample_rows` pass: `rows` [b] that draw
        (None: all), their `temperature` and `top_p` [b], and `draws`: (request owning the generator or None
        for torch's global RNG, uniforms to draw, positions in rows, which of the drawn uniforms they take
        (None: all, in order)): one uniform per non-greedy row of that generator, in row order. A seeded
        request owns its generator, and a sample aborted on its own (`Engine.abort(id, index)`) keeps drawing
        its uniform there, unused, so that its siblings' tokens are those they would have sampled had it run on."""
        if self._plan is None:
            rows, temps, top_ps, by_gen = [], [], [], {}
            for i, (req, k) in enumerate(self.rows):
                if req.finish[k] is not None and not req.draw_finished:
                    continue
                p, gen = req.params, req.generator
                if p.temperature > 0:
                    key = id(gen) if gen is not None else None
                    _, pos, slots = by_gen.setdefault(key, (req if gen is not None else None, [], []))
                    pos.append(len(rows))
                    slots.append(_draw_slot(req, k) if gen is not None else len(slots))
                rows.append(i)
                temps.append(p.temperature)
                top_ps.append(p.top_p)

            def col(values, dtype=torch.long):
                return torch.tensor(values, dtype=dtype, device=self.device)

            draws = []
            for owner, pos, slots in by_gen.values():
                total = len(slots) if owner is None else _draw_slot(owner, None)
                draws.append((owner, total, pos, None if total == len(slots) else slots))
            self._plan = SimpleNamespace(
                rows=None if len(rows) == len(self.rows) else col(rows), n=len(rows),
                temperature=col(temps, torch.float32), top_p=col(top_ps, torch.float32), draws=draws,
            )
        return self._plan


def _draw_slot(req: Request, k: int | None) -> int:
    """Which uniform of its request's own generator sample k takes this step (k None: how many are drawn):
    running samples draw, and so do samples aborted on their own while the request runs on."""
    drawing = [j for j, f in enumerate(req.finish) if f is None or f == "abort"]
    return len(drawing) if k is None else drawing.index(k)


class Scheduler:
    """The waiting queue and the request registry; `admit` picks what joins the running batch next."""

    def __init__(self, max_num_seqs: int | None):
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self._ids = itertools.count()

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add(self, req: Request) -> None:
        self.requests[req.id] = req
        self.waiting.append(req)

    def admit(self, batch: Batch, joins: bool) -> list[Request]:
        """Requests to prefill now: oldest first, while their samples fit beside the live rows.

        joins: the running backend accepts rows mid-flight; if not, requests join only an empty batch.
        A batch runs on one backend; a request for the other waits until the batch drains.
        """
        picked: list[Request] = []
        running = batch.backend if len(batch) else ""
        if running and not joins:
            return picked
        free = None if self.max_num_seqs is None else self.max_num_seqs - batch.n_live
        while self.waiting:
            req = self.waiting[0]
            if (running and req.backend != running) or (free is not None and req.params.n > free):
                break
            running = req.backend
            picked.append(self.waiting.popleft())
            free = None if free is None else free - req.params.n
        return picked

    def remove(self, req: Request) -> None:
        self.requests.pop(req.id, None)
        if req in self.waiting:
            self.waiting.remove(req)
