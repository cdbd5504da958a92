"""The one generation path of r1kit: token ids in, sampled completions (ids, masks, logprobs) out.

Used by RL rollouts, evaluation, `r1kit generate`/`sample` and serving, through one request scheduler
(r1kit/engine/scheduler.py):
- requests: `add_request(prompt_ids, SamplingParams)` queues a prompt with its own temperature, top-p,
  max_tokens, stop token ids, seed and n; each `step()` admits waiting requests while the running samples
  stay within `max_num_seqs` (they join the running batch mid-flight: continuous batching), decodes every
  running sample by one token, samples each row with its request's parameters (a seeded request draws
  from its own torch.Generator, so its tokens do not depend on what else runs), and streams one
  `RequestOutput` per sample. `abort(id)` frees a request's slots for the next step.
- batches: `generate(prompts, group_size=G)` is P requests with n = G sharing one generator; it returns a
  `Rollout`. With all P*G samples in one batch it makes exactly the draws (one uniform per row per step,
  in row order; finished rows keep drawing until compacted) and the numbers of the engine before the
  scheduler, so training figures under a seed are unchanged. It bypasses the prefix cache: RL weights
  change every step, and a batch prefilled together is the layout those figures were measured with.

Per batch:
1. each admitted prompt is prefilled ONCE and its n samples share that prefill (TRL and HF
   `generate(num_return_sequences=G)` prefill every copy); with the prefix cache (r1kit/engine/prefix_cache.py,
   `cache_mb`), only the part after its longest cached run of full blocks is prefilled;
2. decode step by step from a KV cache; rows that finished are dropped from the batch and the cache
   (compaction), so finished rows stop costing compute (TRL decodes them on: 17-31% padding, NOTES.md);
3. per-token logprobs are the sampler's:
       logprob_t = log_softmax(logits_t / temperature)[token_t]
   over the FULL temperature-scaled distribution (before top-p), which is what the trainer recomputes,
   so the importance ratio is 1 on-policy. temperature == 0 is greedy, with raw log_softmax(logits_t).

Two backends share one interface (admit / decode / keep_rows / release):
- `FastLlama` (r1kit/engine/fast_llama.py): a pure-torch forward for Llama-family models (llama, qwen2,
  mistral: RMSNorm, default RoPE, GQA, SiLU-gated MLP, optional biases, tied or untied lm_head) that reads
  the HF module's parameters in place (no copies: optimizer updates are seen at once), with caches in a
  shared-prefix layout (the prompt's K/V stored and read once per group). With `dtype` (`engine.dtype`)
  other than the model's, e.g. bf16 sampling beside fp32 master weights, it reads copies cast once and
  refreshed when a parameter changes (the next batch after an optimizer step sees it, with no call).
  Where Python and HF per-step overhead dominate (tiny models, CPU) it is several times faster than
  `model.generate()`. Rows join it mid-flight, and it prefills on top of cached prefix blocks.
- `HFBackend` (r1kit/engine/hf_backend.py): the model's own forward with a `DynamicCache`, for every
  other architecture and for Llama-family configs with features the fast path lacks (rope scaling, a
  sliding window shorter than the sequence, q/k norms, ...): we fall back rather than be silently wrong
  (`Engine.fallback_reason`). It batches less cleverly: requests join only an empty batch (they wait for
  the running one to drain), and it has no prefix cache. It computes in the model's own dtype only: a
  `dtype` other than that is an error where this backend would run.

Speed: `python benchmarks/bench_engine.py` (results in benchmarks/results/engine.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from r1kit.engine.api import CacheStats, RequestOutput, SamplingParams
from r1kit.engine.fast_llama import FastLlama, fast_path_problem
from r1kit.engine.hf_backend import HFBackend
from r1kit.engine.inputs import check_generate_args, check_prompt, left_pad
from r1kit.engine.inputs import engine_dtype as _engine_dtype
from r1kit.engine.inputs import max_positions as _max_positions
from r1kit.engine.inputs import token_ids as _token_ids
from r1kit.engine.prefix_cache import PrefixCache
from r1kit.engine.sampling import sample_rows, sample_tokens
from r1kit.engine.scheduler import Batch, Request, Scheduler
from r1kit.types import R1KitError, Rollout


@dataclass
class EngineStats:
    """Counters accumulated over an Engine's lifetime (call `reset()` to zero them)."""

    prefill_calls: int = 0  # forward passes over prompts
    prefill_tokens: int = 0  # prompt positions pushed through prefill: P * Tp, not P * G * Tp
    decode_steps: int = 0  # single-token forward passes
    decode_tokens: int = 0  # rows summed over decode steps (what compaction keeps small)
    compactions: int = 0  # times finished rows were dropped from the batch and cache
    generated_tokens: int = 0  # completion tokens returned (mask sum)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


class Engine:
    """The request-level sampler over a causal LM: see the module docstring.

    eos_token_ids: tokens that end a completion (kept in it, mask 1); an empty list never stops early.
    fast_path: None picks the fast Llama-family forward when the model supports it; False forces the
        HF forward; True raises if the model cannot use the fast path.
    compact_fraction: finished rows are dropped from the batch once they are at least this fraction of
        it. Compaction copies the surviving rows' cache, so doing it for every single finished row costs
        more than it saves; 0 compacts whenever any row finishes. (An abort compacts at the next step.)
    max_num_seqs: running samples at most (None: no limit); waiting requests join as slots free up.
    cache_mb: prefix-cache budget in MiB (0 turns it off); block_size: tokens per cached KV block.
    dtype: `engine.dtype`, the dtype to sample in: "auto"/None (the model's own), "bf16"/"bfloat16",
        "fp32"/"float32" or a torch dtype. Another dtype than the model's needs the fast path (FastLlama's
        cached copies of the weights; the model's master weights are untouched).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        fast_path: bool | None = None,
        compact_fraction: float = 0.125,
        max_num_seqs: int | None = None,
        cache_mb: float = 256.0,
        block_size: int = 16,
        dtype: str | torch.dtype | None = "auto",
    ):
        emb = model.get_input_embeddings().weight
        vocab = emb.shape[0]
        eos_token_ids = _token_ids("eos_token_ids", eos_token_ids, vocab)
        pad_token_id = _token_ids("pad_token_id", [pad_token_id], vocab)[0]
        if not 0.0 <= compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in [0, 1], got {compact_fraction}")
        if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or max_num_seqs < 1):
            raise R1KitError(f"Engine: max_num_seqs must be an int >= 1 or None, got {max_num_seqs!r}")
        self.model, self.vocab_size, self.compact_fraction = model, vocab, compact_fraction
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        self.fallback_reason = fast_path_problem(model) if fast_path is not False else "fast_path=False"
        if fast_path and self.fallback_reason:
            raise R1KitError(f"Engine: fast_path=True but this model cannot use it: {self.fallback_reason}")
        self.dtype = _engine_dtype(dtype, emb.dtype)  # what the sampling forward computes in
        if self.dtype != emb.dtype and self.fallback_reason:
            raise R1KitError(f"engine.dtype={dtype!r} samples with {self.dtype} copies of the {emb.dtype} weights, "
                             f"which only the fast Llama-family path does, and this engine cannot use it "
                             f"({self.fallback_reason}); set engine.dtype=auto")
        self._fast = FastLlama(model, self.dtype) if self.fallback_reason is None else None
        self._hf = HFBackend(model)
        self.max_positions = _max_positions(model.config)
        self.device = model.get_input_embeddings().weight.device
        self.stats = EngineStats()
        self.last_backend = ""  # "fast" or "hf": which forward the last batch used
        self.scheduler = Scheduler(max_num_seqs)
        self.batch = Batch(self.device)
        self.prefix_cache = self._make_prefix_cache(cache_mb, block_size)
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        self._backend = None  # the forward of the running batch
        self._dense = None  # generate()'s output buffers while it runs
        self._abort_outputs: list[RequestOutput] = []

    # -- the request interface (r1kit.engine.api.GenerationEngine) ------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a prompt; it joins the running batch at the next step with free slots. Returns its id."""
        if not isinstance(params, SamplingParams):
            raise R1KitError(f"Engine.add_request: params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt = check_prompt("Engine.add_request: prompt", prompt_ids, self.vocab_size)
        _token_ids("SamplingParams.stop_token_ids", params.stop_token_ids, self.vocab_size)
        if self.max_positions is not None and len(prompt) + params.max_tokens > self.max_positions:
            raise R1KitError(
                f"Engine.add_request: prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the model's max_position_embeddings ({self.max_positions})"
            )
        limit = self.scheduler.max_num_seqs
        if limit is not None and params.n > limit:
            raise R1KitError(f"Engine.add_request: n={params.n} samples exceed max_num_seqs={limit}")
        if self._dense is not None:
            raise R1KitError("Engine.add_request: generate() is running on this engine")
        request_id = self.scheduler.new_id() if request_id is None else str(request_id)
        if request_id in self.scheduler.requests:
            raise R1KitError(f"Engine.add_request: request id {request_id!r} is already in flight")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        backend = self._backend_for(len(prompt) + params.max_tokens)
        self.scheduler.add(Request(request_id, prompt, params, gen, backend))
        return request_id

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request now (index None), or only its sample `index` (a sample that hit a stop string while
        its siblings run on). The stopped samples' slots are free for the next step, which reports them with
        finish_reason "abort". Unknown ids, finished samples and out-of-range indices are ignored (a finish
        can race an abort)."""
        req = self.scheduler.requests.get(request_id)
        if req is None or (index is not None and not (isinstance(index, int) and 0 <= index < req.params.n)):
            return
        samples = range(req.params.n) if index is None else [index]
        if index is None:
            req.aborted = True
        rows = [i for i, (r, k) in enumerate(self.batch.rows) if r is req and r.finish[k] is None and k in samples]
        self._drop_rows(rows)
        for k in samples:
            if req.finish[k] is None:
                req.finish[k] = "abort"
                req.live -= 1
                self._abort_outputs.append(RequestOutput(req.id, k, [], [], True, "abort", len(req.prompt),
                                                         req.cached_tokens))
        if index is None or req.live == 0:
            self._finish_request(req)

    def _drop_rows(self, rows: list[int]) -> None:
        """Aborted rows stop drawing and free their slots now; the next step compacts them away."""
        for i in rows:
            self.batch.retire(i)
        if rows:
            with torch.inference_mode():  # the batch's tensors were made in inference mode
                self.batch.live[torch.tensor(rows, device=self.device)] = False
            self.batch.aborted = True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.requests) or bool(self._abort_outputs)

    def step(self) -> list[RequestOutput]:
        """One decode step of every running sample, after admitting waiting requests (their prefill and
        first token happen in this step). Returns one RequestOutput per sample that produced a token or
        finished."""
        outputs, self._abort_outputs = self._abort_outputs, []
        if not self.scheduler.requests:
            return outputs
        was_training = self.model.training
        if was_training:  # (eval() walks every module: not per step when the model is in eval mode already)
            self.model.eval()  # dropout off while sampling; restored below
        try:
            with torch.inference_mode():
                outputs += self._step()
        except BaseException:
            for req in list(self.scheduler.requests.values()):
                self.abort(req.id)  # the batch is in an unknown state: fail its requests, keep the engine usable
            self._release()
            raise
        finally:
            if was_training:
                self.model.train()
        return outputs

    def load_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A no-op for the weights (the local engine reads the HF module's parameters in place); it drops
        the prefix cache, whose K/V were computed with the old weights, and the fast path's copies in
        another `dtype`. (Both also notice in-place parameter updates by themselves: see
        PrefixCache.check_weights and FastLlama._weight.)"""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        if self._fast is not None:
            self._fast.drop_copies()

    def cache_stats(self) -> CacheStats:
        return self.prefix_cache.stats() if self.prefix_cache is not None else CacheStats()

    # -- the batch interface --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        group_size: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample `group_size` completions for each prompt; rows are prompt-major (row p*G + g).

        prompts: P unpadded token-id lists. Returns a Rollout with prompt_ids/mask [N, Tp] (left-padded),
        completion_ids/mask and logprobs [N, Tc] (Tc = longest completion generated) and truncated [N].
        Served by the request scheduler: P requests with n = G sharing `generator`, one uniform draw per
        row per step in row order (finished rows draw until compacted), so that with all P*G samples in
        one batch (P*G <= max_num_seqs) the draws and numbers are those of the original one-batch engine.
        It bypasses the prefix cache (see the module docstring).
        """
        check_generate_args("Engine.generate", prompts, group_size, max_new_tokens, temperature, top_p,
                            self.vocab_size, self.max_positions)
        if self.scheduler.requests or self._abort_outputs:
            raise R1KitError("Engine.generate: requests added with add_request are in flight; finish or abort "
                             "them first (or drive them with step())")
        limit = self.scheduler.max_num_seqs
        if limit is not None and group_size > limit:
            raise R1KitError(f"Engine.generate: group_size={group_size} exceeds max_num_seqs={limit}")
        ids, mask = left_pad(prompts, self.pad_token_id, self.device)  # [P, Tp]
        backend = self._backend_for(ids.shape[1] + max_new_tokens)
        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        was_training = self.model.training
        self.model.eval()  # dropout off while sampling; restored below
        try:
            with torch.inference_mode():
                self._dense = self._dense_buffers(len(prompts) * group_size, max_new_tokens)
                for p, prompt in enumerate(prompts):
                    self.scheduler.add(Request(self.scheduler.new_id(), list(prompt), params, generator, backend,
                                               draw_finished=True, use_cache=False, first_sid=p * group_size))
                while self.scheduler.requests:
                    self._step()
                out = self._dense
        finally:
            for req in list(self.scheduler.requests.values()):  # only after an error
                self.scheduler.remove(req)
            self._release()
            self._dense = None
            self.model.train(was_training)
        # Built outside inference mode, so the trainer can feed them to autograd.
        return self._rollout(ids, mask, group_size, out.tokens, out.logprobs, out.lengths, out.stopped)

    def _dense_buffers(self, N: int, max_new: int) -> SimpleNamespace:
        """generate()'s outputs, [N, max_new + 1]: one spare column, where finished rows' draws go."""
        dev = self.device
        return SimpleNamespace(
            tokens=torch.full((N, max_new + 1), self.pad_token_id, dtype=torch.long, device=dev),
            logprobs=torch.zeros(N, max_new + 1, dtype=torch.float32, device=dev),
            lengths=torch.full((N,), max_new, dtype=torch.long, device=dev),
            stopped=torch.zeros(N, dtype=torch.bool, device=dev),
        )

    # -- one step -------------------------------------------------------------------------------------

    def _step(self) -> list[RequestOutput]:
        """Admit, decode the running rows, prefill the admitted, sample every row, retire finished rows."""
        batch = self.batch
        if batch.aborted:
            self._compact()  # aborted rows stop costing compute at once
            batch.aborted = False
        joins = self._backend is None or self._backend.supports_joins
        admitted = self._defer_shared_misses(self.scheduler.admit(batch, joins))
        logits = []
        if len(batch):
            positions = batch.last_pos + (batch.t if batch.t is not None else batch.length)  # [B] fed token's
            logits.append(self._backend.decode(batch.last, positions))
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(batch)
        if admitted:
            logits.append(self._prefill(admitted))
        if not logits:
            return []
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)  # [B, V]
        return self._advance(*self._sample(logits))

    def _prefill(self, admitted: list[Request]) -> torch.Tensor:
        """Prefill the admitted requests' prompts (their uncached parts) into the batch; logits [n rows, V]."""
        if not len(self.batch):
            self._backend = self._fast if admitted[0].backend == "fast" else self._hf
            self.batch.backend = self.last_backend = admitted[0].backend
        past = self._cache_lookup(admitted)
        ids, mask = left_pad([r.prompt[r.cached_tokens:] for r in admitted], self.pad_token_id, self.device)
        counts = [r.params.n for r in admitted]
        max_pos = max(len(r.prompt) + r.params.max_tokens for r in admitted)
        logits = self._backend.admit(ids, mask, counts, max_pos, max(r.params.max_tokens for r in admitted), past)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += ids.numel()
        first_row = len(self.batch)
        self.batch.append(admitted)
        self._drop_rows([first_row + i for i, (r, k) in enumerate(self.batch.rows[first_row:]) if r.finish[k]])
        self._cache_store_prompts(admitted)
        if len(set(counts)) == 1:
            return logits.repeat_interleave(counts[0], 0)  # n rows per prompt, prefilled once
        return logits.repeat_interleave(torch.tensor(counts, device=logits.device), 0)

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row with its request's parameters and generator -> tokens [B], logprobs [B].

        generate(): sample_tokens per (generator, temperature, top_p) group, the original draws;
        add_request: one sample_rows pass over every row, each request's uniforms from its generator."""
        if self._dense is None:
            return self._sample_requests(logits)
        groups = self.batch.groups()
        if len(groups) == 1 and groups[0][3] is None:
            gen, temperature, top_p, _ = groups[0]
            return sample_tokens(logits, temperature, top_p, gen)
        tokens, logprobs = self.batch.last.clone(), torch.zeros(len(self.batch), device=logits.device)
        for gen, temperature, top_p, idx in groups:
            tokens[idx], logprobs[idx] = sample_tokens(logits[idx], temperature, top_p, gen)
        return tokens, logprobs

    def _sample_requests(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.batch.plan()
        u = [0.0] * plan.n
        for owner, total, pos, take in plan.draws:  # on the CPU, like sample_tokens' draws
            drawn = torch.rand((total, 1)).squeeze(1).tolist() if owner is None else owner.uniforms(total)
            for p, j in zip(pos, range(total) if take is None else take):
                u[p] = drawn[j]
        u = torch.tensor(u, dtype=torch.float32)  # float32 draws round-trip through Python floats exactly
        if plan.rows is None:
            return sample_rows(logits, plan.temperature, plan.top_p, u.to(logits.device))
        tokens, logprobs = self.batch.last.clone(), torch.zeros(len(self.batch), device=logits.device)
        tokens[plan.rows], logprobs[plan.rows] = sample_rows(logits[plan.rows], plan.temperature, plan.top_p,
                                                             u.to(logits.device))
        return tokens, logprobs

    def _advance(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> list[RequestOutput]:
        """Record the sampled tokens, finish rows on a stop id or max_tokens, compact, report."""
        b = self.batch
        all_live, live = b.n_live == len(b), b.live
        hit = torch.isin(tokens, self._eos)  # [B]
        if not b.all_eos:
            hit &= b.eos
        if b.stops is not None:
            hit |= (tokens[:, None] == b.stops).any(1)
        if not all_live:
            hit &= live
        if b.t is not None:  # every row has the same length (admitted together): no per-row lengths
            length = finished_len = b.t + 1
            finished = hit
            if length >= b.min_max_len:
                full = length >= b.max_len
                finished = hit | (full if all_live else full & live)
            b.t = length
        else:
            length = b.length + 1 if all_live else b.length + live  # [B] tokens per row after this one
            full = length >= b.max_len
            finished = hit | (full if all_live else full & live)
            b.length = finished_len = length
        b.last = tokens
        self.stats.generated_tokens += b.n_live
        if self._dense is not None:
            self._record_dense(tokens, logprobs, length, live, all_live)
        done_idx = finished.nonzero().squeeze(1) if bool(finished.any()) else None  # [d] (host syncs)
        done = [] if done_idx is None else done_idx.tolist()
        if done:
            b.live = live ^ finished  # finished rows are live ones
            hit_done = hit[done_idx]
            for row, was_hit in zip(done, hit_done.tolist()):
                req, k = b.rows[row]
                req.finish[k] = "stop" if was_hit else "length"
            if self._dense is not None:
                d, sid = self._dense, b.sid[done_idx]
                d.lengths[sid] = finished_len if isinstance(finished_len, int) else finished_len[done_idx]
                d.stopped[sid] = hit_done
        outputs = [] if self._dense is not None else self._outputs(tokens, logprobs, live, all_live)
        self._retire(done)
        return outputs

    def _retire(self, done: list[int]) -> None:
        """Rows `done` finished this step: store their K/V for reuse, finish their requests, compact."""
        b = self.batch
        for row in done:
            req, k = b.rows[row]
            if self._dense is None and self._caches(req) and req.finish[k] != "abort":
                self._cache_store_sample(row, req, k)
            b.retire(row)
            req.live -= 1
            if req.live == 0:
                self._finish_request(req)
        if b.n_live == 0:
            self._release()
        elif len(b) - b.n_live >= max(1.0, self.compact_fraction * len(b)):
            self._compact()

    def _record_dense(self, tokens, logprobs, length, live, all_live) -> None:
        """generate(): write the sampled tokens into the [N, max_new + 1] output buffers. A finished row
        still in the batch writes past its length (a uniform batch, as before the scheduler) or to the
        spare last column: the Rollout never shows either."""
        d = self._dense
        if isinstance(length, int) or all_live:
            col = length - 1
        else:
            col = torch.where(live, length - 1, d.tokens.shape[1] - 1)
        d.tokens[self.batch.sid, col], d.logprobs[self.batch.sid, col] = tokens, logprobs

    def _outputs(self, tokens, logprobs, live, all_live) -> list[RequestOutput]:
        """add_request's stream: one RequestOutput per row that produced a token this step."""
        rows = range(len(self.batch)) if all_live else live.nonzero().squeeze(1).tolist()
        toks, lps, outs = tokens.tolist(), logprobs.tolist(), []
        keep_tokens = self.prefix_cache is not None
        for i in rows:
            req, k = self.batch.rows[i]
            if keep_tokens:
                req.tokens[k].append(toks[i])
            reason = req.finish[k]
            outs.append(RequestOutput(req.id, k, [toks[i]], [lps[i]], reason is not None, reason,
                                      len(req.prompt), req.cached_tokens))
        return outs

    def _compact(self) -> None:
        keep = self.batch.live.nonzero().squeeze(1)  # [b] ascending
        self._backend.keep_rows(keep, trim=self._dense is None)
        self.batch.keep(keep)
        self.stats.compactions += 1

    def _release(self) -> None:
        if self._backend is not None:
            self._backend.release()
        self._backend = None
        self.batch.clear()

    def _finish_request(self, req: Request) -> None:
        self.scheduler.remove(req)
        if self.prefix_cache is not None:
            self.prefix_cache.release(req.blocks)
            req.blocks = []

    # -- the prefix cache -----------------------------------------------------------------------------

    def _make_prefix_cache(self, cache_mb: float, block_size: int) -> PrefixCache | None:
        """The prefix cache, or None when cache_mb == 0 or the model runs on the HF forward (which
        cannot prefill on top of cached K/V)."""
        if not (isinstance(cache_mb, (int, float)) and cache_mb >= 0):
            raise R1KitError(f"Engine: cache_mb must be a number >= 0, got {cache_mb!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise R1KitError(f"Engine: block_size must be an int >= 1, got {block_size!r}")
        if cache_mb == 0 or self._fast is None:
            return None
        L, n_kv, D = self._fast.kv_shape
        per_token = L * 2 * n_kv * D * self._fast.kv_dtype.itemsize
        return PrefixCache(self.model, block_size, int(cache_mb * 2**20), per_token)

    def _defer_shared_misses(self, admitted: list[Request]) -> list[Request]:
        """A request whose first block is also an earlier admitted request's, and is not cached yet, waits
        one step (at the head of the queue): it then hits the blocks that request stores, instead of
        prefilling the same prefix in the same batch (a system prompt sent by many clients at once)."""
        if self.prefix_cache is None or len(admitted) < 2:
            return admitted
        bs, kept, deferred, seen = self.prefix_cache.block_size, [], [], set()
        for req in admitted:
            first = tuple(req.prompt[:bs]) if self._caches(req) and len(req.prompt) > bs else None
            if first is not None and first in seen and not self.prefix_cache.has_prefix(req.prompt, 1):
                deferred.append(req)
                continue
            kept.append(req)
            seen.add(first)
        self.scheduler.waiting.extendleft(reversed(deferred))
        return kept

    def _caches(self, req: Request) -> bool:
        return self.prefix_cache is not None and req.use_cache and req.backend == "fast"

    def _cache_lookup(self, admitted: list[Request]):
        """Serve each admitted prompt's longest cached prefix (at least its last token is prefilled, for
        its logits) -> None or (kv [L, 2, P, Hkv, C, D], valid [P, C]) right-aligned, for FastLlama.admit."""
        if not any(self._caches(r) for r in admitted):
            return None
        cache = self.prefix_cache
        epoch = cache.check_weights(rescan=not len(self.batch))
        for req in admitted:
            if self._caches(req):
                req.cache_epoch = epoch
                req.blocks = cache.lookup(req.prompt, (len(req.prompt) - 1) // cache.block_size)
                req.cached_tokens = len(req.blocks) * cache.block_size
        C = max(r.cached_tokens for r in admitted)
        if C == 0:
            return None
        L, n_kv, D = self._fast.kv_shape
        emb = self.model.get_input_embeddings().weight
        if all(r.cached_tokens == C for r in admitted):  # (one request, say) nothing to pad: one copy
            kv = torch.stack([torch.cat([b.kv for b in r.blocks], dim=3) for r in admitted], dim=2)
            return kv, torch.ones(len(admitted), C, dtype=torch.bool, device=emb.device)
        kv = torch.zeros(L, 2, len(admitted), n_kv, C, D, device=emb.device, dtype=self._fast.kv_dtype)
        valid = torch.zeros(len(admitted), C, dtype=torch.bool, device=emb.device)
        for i, req in enumerate(admitted):
            if req.cached_tokens:
                kv[:, :, i, :, C - req.cached_tokens :] = torch.cat([b.kv for b in req.blocks], dim=3)
                valid[i, C - req.cached_tokens :] = True
        return kv, valid

    def _cache_store_prompts(self, admitted: list[Request]) -> None:
        """Store the full blocks of the admitted prompts that the cache does not hold yet."""
        bs = self.prefix_cache.block_size if self.prefix_cache is not None else 0
        first_slot = self._backend.n_prompts - len(admitted) if self._backend is self._fast else 0
        for i, req in enumerate(admitted):
            if self._caches(req) and len(req.prompt) // bs > len(req.blocks):  # held until it finishes
                req.blocks += self.prefix_cache.insert(req.prompt, self._fast.slot_kv(first_slot + i), hold=True)

    def _cache_store_sample(self, row: int, req: Request, k: int) -> None:
        """A finished sample's prompt + completion blocks (a multi-turn follow-up starts with them). The
        last sampled token was never fed, so its K/V do not exist: blocks cover the tokens before it."""
        fed, bs = req.tokens[k][:-1], self.prefix_cache.block_size
        if self.prefix_cache.check_weights() != req.cache_epoch:
            return  # the weights changed while it ran: its K/V are not those of the current model
        if (len(req.prompt) + len(fed)) // bs > len(req.prompt) // bs:
            self.prefix_cache.insert(req.prompt + fed, self._fast.prompt_kv(row, len(fed)))

    def _rollout(self, ids, mask, G, tokens, logprobs, lengths, stopped) -> Rollout:
        Tc = int(lengths.max())
        completion_mask = torch.arange(Tc, device=ids.device)[None, :] < lengths[:, None]  # [N, Tc]
        return Rollout(
            prompt_ids=ids.repeat_interleave(G, 0),
            prompt_mask=mask.repeat_interleave(G, 0),
            completion_ids=torch.where(completion_mask, tokens[:, :Tc], self.pad_token_id),
            completion_mask=completion_mask.float(),
            logprobs=torch.where(completion_mask, logprobs[:, :Tc], 0.0),
            truncated=~stopped,
            group_size=G,
        )

    # -- inputs ---------------------------------------------------------------------------------------

    def _backend_for(self, total_len: int) -> str:
        if self._fast is None:
            return "hf"
        problem = self._fast.supports_length(total_len)
        if problem is not None and self.dtype != self.model.get_input_embeddings().weight.dtype:
            raise R1KitError(f"Engine: {problem}, which only the HF forward can run, and it cannot sample in "
                             f"engine.dtype {self.dtype}; set engine.dtype=auto")
        return "fast" if problem is None else "hf"
