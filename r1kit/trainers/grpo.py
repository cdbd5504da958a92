"""The GRPO training loop (DeepSeekMath / DeepSeek-R1) and its family of variants, orchestration only.

One step, read top to bottom in `GRPOTrainer.step`:
    sample P prompts x G completions and score them (DAPO dynamic sampling: repeat until P groups have
    a spread of rewards) -> old-policy logprobs (the sampler's, or recomputed) -> reference logprobs
    (only if beta > 0) -> rewards minus the KL penalty (kl_mode="reward") -> group advantages
    -> loss mask (overlong rows, high-entropy tokens) -> mu optimizer steps on the objective -> metrics.

The maths lives in r1kit.algorithms as pure functions looked up by the names in the config
(`advantage`, `loss_type`, `agg_mode`, `kl_estimator`); the trainer never branches on a variant's name.
Presets (`grpo.preset`, values in r1kit.config.GRPO_PRESETS; a key set in the YAML file or on the
command line wins over the preset, which wins over the defaults; reward_weights merge key by key):

  grpo_paper    GRPO as in DeepSeekMath (Shao et al. 2024, eq. 3) / R1 eq. 1-3: group-std advantages,
                per-token clip 0.2, 1/|o| per sequence, KL k3 in the loss, beta 0.04 (DeepSeekMath)
  dr_grpo       Dr. GRPO (Liu et al. 2025): no std, no 1/|o| (sum / max_new_tokens), no KL
  dapo          DAPO (Yu et al. 2025): clip-higher 0.28, token-mean, dynamic sampling, overlong
                filtering and the soft overlong reward ("overlong", r1kit/rewards/shaping.py), no KL
  gspo          GSPO (Zheng et al. 2025): sequence-level ratio, clip 3e-4 / 4e-4 (the paper's)
  rloo          RLOO (Ahmadian et al. 2024): leave-one-out baseline, on-policy REINFORCE, token sum
  reinforce_pp  REINFORCE++-baseline (Hu et al. 2025): group-centred then batch-whitened advantages,
                PPO clip, token-mean, k1 KL subtracted from the reward (beta 0.001, our choice)

Data parallel (torchrun, r1kit/dist.py): each rank samples a contiguous share of whole prompt groups of the
global batch, each group from its own random stream (`grpo.rollout_seeds`); advantages, loss normalisers and
metrics are computed over the global batch, gradients summed over ranks; rank 0 logs, evaluates and saves.

Departures from the papers: the old-policy logprobs are the sampler's own (the engine returns
log softmax(logits / T) exactly as the trainer computes it), so on-policy training needs no extra
forward pass; set `grpo.recompute_old_logprobs` when sampler and trainer differ (e.g. `engine.dtype=bf16`
beside fp32 training; then `grpo.tis_cap` enables truncated importance sampling). With one update per batch
(mu = 1) the recomputation costs no extra forward: pi_old IS the policy at that update, so its logprobs are
the update forward's own, detached (`GRPOTrainer.fuse_old_logprobs`). The overlong reward measures length
in sampled tokens, which the trainer attaches to each row's copy of its problem (see r1kit/rewards/shaping.py).
"""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

import r1kit.rewards.shaping  # noqa: F401  registers the "overlong" reward
from r1kit import dist
from r1kit.algorithms import (
    agg_denominator,
    compute_advantages,
    high_entropy_mask,
    kl_reward_penalty,
    mask_truncated_rows,
    policy_objective,
    validate_algorithm_options,
)
from r1kit.checkpoint import latest_checkpoint, load_trainer_state, restore_rng, rng_state, save_checkpoint
from r1kit.config import GRPO_PRESETS, GRPOConfig, RunConfig, to_dict
from r1kit.engine import GenerationEngine
from r1kit.engine.inputs import engine_dtype
from r1kit.logger import MetricsLogger, NullLogger, plot_curves
from r1kit.policy import MIXED_PRECISION, Policy
from r1kit.progress import progress_bar
from r1kit.rewards import score_completions
from r1kit.rewards.functions import has_reflection
from r1kit.rewards.shaping import default_overlong_buffer, with_completion_lengths
from r1kit.templates import render_prompt
from r1kit.trainers.grpo_batch import Sampled, SamplingStats, StepBatch, collect_groups, generate_groups
from r1kit.trainers.packed_forward import completion_logprobs
from r1kit.types import Problem, R1KitError, Rollout

__all__ = ["GRPOTrainer", "KL_MODES", "PRESETS", "Sampled", "SamplingStats", "StepBatch", "check_grpo_options",
           "decode_completions", "micro_inputs"]

PRESETS = GRPO_PRESETS

# Where beta * KL goes: (share in the loss, share in the reward). A lookup, so the loop never asks which.
KL_MODES: dict[str, tuple[float, float]] = {"loss": (1.0, 0.0), "reward": (0.0, 1.0)}

CURVE_PANELS = [
    ("held-out accuracy (pass@1)", ["eval/pass1"]),
    ("reward", ["reward", "reward/accuracy", "reward/format"]),
    ("completion length (tokens)", ["completion_len_mean"]),
    ("reflection rate", ["reflection_rate"]),
]


POSTFIX = {"reward": "reward", "acc": "reward/accuracy", "len": "completion_len_mean", "eval": "eval/pass1"}

ROLLOUT_SEEDS = ("auto", "batch", "group")  # see GRPOConfig.rollout_seeds

# Metrics that are partial sums over micro-batches (each divides by the full batch's denominator).
_SUMMED = ("loss", "pg_loss")


def check_grpo_options(g: GRPOConfig) -> None:
    """Raise R1KitError naming the `grpo.*` field at fault; the algorithm knobs are checked by
    `validate_algorithm_options` (its errors name the field too)."""
    validate_algorithm_options(g.loss_type, g.agg_mode, g.advantage, g.kl_estimator, g.clip_low, g.clip_high,
                               g.beta, clip_ratio_c=g.clip_ratio_c, entropy_coef=g.entropy_coef, tis_cap=g.tis_cap,
                               norm_const=g.max_new_tokens)
    problems = []
    if g.group_size < 2:
        problems.append(f"grpo.group_size must be at least 2 (advantages compare samples of a group), got {g.group_size}")
    if g.prompts_per_step < 1:
        problems.append(f"grpo.prompts_per_step must be at least 1, got {g.prompts_per_step}")
    if g.kl_mode not in KL_MODES:
        problems.append(f"grpo.kl_mode={g.kl_mode!r} is unknown; allowed values: {list(KL_MODES)}")
    if g.entropy_top_fraction is not None and not 0.0 < g.entropy_top_fraction <= 1.0:
        problems.append(f"grpo.entropy_top_fraction must be in (0, 1] or null, got {g.entropy_top_fraction}")
    if g.max_sampling_tries < 1:
        problems.append(f"grpo.max_sampling_tries must be at least 1, got {g.max_sampling_tries}")
    if g.tis_cap is not None and not g.recompute_old_logprobs:
        problems.append("grpo.tis_cap needs grpo.recompute_old_logprobs=true: without a recomputation the old "
                        "logprobs are the sampler's and the TIS weights would all be 1")
    if g.overlong_buffer is not None and not 0 <= g.overlong_buffer <= g.max_new_tokens:
        problems.append(f"grpo.overlong_buffer must be in [0, grpo.max_new_tokens={g.max_new_tokens}], "
                        f"got {g.overlong_buffer}")
    if g.rollout_seeds not in ROLLOUT_SEEDS:
        problems.append(f"grpo.rollout_seeds={g.rollout_seeds!r} is unknown; allowed values: {list(ROLLOUT_SEEDS)}")
    if g.skip_zero_advantage and (g.beta * KL_MODES.get(g.kl_mode, (1.0, 0.0))[0] > 0 or g.entropy_coef != 0):
        problems.append("grpo.skip_zero_advantage is exact only without a KL term in the loss and without an entropy "
                        "bonus (a zero-advantage row still has their gradient): set grpo.beta=0 or grpo.kl_mode=reward, "
                        "and grpo.entropy_coef=0")
    if dist.world() > 1:  # select from the FULL batch, which no rank holds / ranks would run unequal micro-batches
        problems += [f"grpo.{k} is not supported on several ranks yet"
                     for k in ("dynamic_sampling", "entropy_top_fraction", "skip_zero_advantage")
                     if getattr(g, k) not in (False, None)]
    if g.preset is not None and g.preset not in PRESETS:
        problems.append(f"grpo.preset={g.preset!r} is unknown; known presets: {sorted(PRESETS)}")
    if problems:
        raise R1KitError("; ".join(problems))


@contextmanager
def _timed(times: dict[str, float], key: str):
    """Add the block's wall time to times[key] (a phase may run several times per step)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        times[key] = times.get(key, 0.0) + time.perf_counter() - t


def _accumulate(acc: dict[str, float], metrics: dict[str, Any], mean_weight: float, sum_weight: float) -> None:
    """Fold one micro-batch's metrics into `acc`: *_max by max, _SUMMED by sum, the rest by weighted mean."""
    for k, v in metrics.items():
        v = float(v)
        if k.endswith("_max"):
            acc[k] = max(acc.get(k, v), v)
        else:
            acc[k] = acc.get(k, 0.0) + v * (sum_weight if k in _SUMMED else mean_weight)


class GRPOTrainer:
    """GRPO on a `Policy` built by the recipe (r1kit.policy): the trainer owns no model of its own. The
    policy's module is what the engine samples from and what is checkpointed; training forwards go through
    `policy.model` (a DDP/FSDP wrapper when r1kit.dist set one). With beta > 0 the reference is `ref_model`
    when given, else the policy's adapters-off network (LoRA) or a frozen copy of its initial weights."""

    def __init__(self, cfg: RunConfig, policy: Policy, task, run_dir: Path, *, ref_model=None,
                 evaluate: Callable[[GenerationEngine, int], dict[str, float]] | None = None,
                 engine: GenerationEngine | None = None):
        g = cfg.grpo
        check_grpo_options(g)
        if not isinstance(policy, Policy):
            raise TypeError(f"GRPOTrainer takes an r1kit.policy.Policy, got {type(policy).__name__}")
        self.cfg, self.policy, self.task = cfg, policy, task
        self.model, self.tokenizer = policy.module, policy.tokenizer  # the unwrapped module, for engine and checkpoints
        self.evaluate = evaluate
        if g.beta > 0:  # with beta = 0 no reference exists and none is ever called
            policy.keep_reference(ref_model)
        self.run_dir = Path(run_dir)
        self.overlong_buffer = g.overlong_buffer if g.overlong_buffer is not None else default_overlong_buffer(g.max_new_tokens)
        self._check_sampler_precision(cfg, policy)
        self.engine = engine if engine is not None else policy.make_engine(backend=cfg.engine.backend,
                                                                           dtype=cfg.engine.dtype)
        # pi_old = the update forward's own logprobs, detached (no separate no-grad forward): exact when the
        # only update's forward is the old policy's, i.e. mu = 1, and nothing needs pi_old (or its entropy)
        # before the update: no entropy mask, no KL penalty in the reward. (Exact up to dropout, which the
        # update's forward applies and the separate, eval-mode forward does not; r1kit's models have none.)
        self.fuse_old_logprobs = (g.recompute_old_logprobs and g.updates_per_batch == 1
                                  and g.entropy_top_fraction is None and g.beta * KL_MODES[g.kl_mode][1] == 0)
        dist.share(g.prompts_per_step, "grpo.prompts_per_step")  # under torchrun: whole groups per rank, or an error
        dist.prepare(policy, cfg.dist.strategy)  # DDP / FSDP2 when on several ranks; before the optimizer
        self.optimizer = policy.make_optimizer(g.lr, g.weight_decay, betas=(0.9, 0.99))
        # "group": one random stream per (step, round, global group index), so any rank layout samples alike
        self.group_streams = g.rollout_seeds == "group" or (g.rollout_seeds == "auto" and dist.world() > 1)
        self._round = 0  # sampling rounds so far in this step (dynamic sampling runs several)
        self.py_rng = random.Random(cfg.seed)
        self.generator = policy.generator(cfg.seed)
        self.step_idx = 0

    @staticmethod
    def _check_sampler_precision(cfg: RunConfig, policy: Policy) -> None:
        """An explicit `engine.dtype` other than the training precision (bf16 autocast under
        model.mixed_precision=bf16, else the weights' dtype) samples from another distribution than the
        trainer's: the sampler's logprobs cannot be the ratio's denominator, so pi_old must be recomputed.
        ("auto", the model's own dtype, keeps today's behaviour under mixed precision.)"""
        sampler = engine_dtype(cfg.engine.dtype, policy.dtype)  # a bad value is an error naming engine.dtype
        trainer = MIXED_PRECISION[policy.mixed_precision] or policy.dtype
        if cfg.engine.dtype != "auto" and sampler != trainer and not cfg.grpo.recompute_old_logprobs:
            raise R1KitError(f"engine.dtype={cfg.engine.dtype!r} samples in {sampler}, but training computes in "
                             f"{trainer} (model.mixed_precision={policy.mixed_precision!r}): the sampler's logprobs "
                             f"would be the ratio's denominator; set grpo.recompute_old_logprobs=true (free with "
                             f"grpo.updates_per_batch=1) or engine.dtype=auto")

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, resume: bool = False, initial_metrics: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """Run to `grpo.steps`; `initial_metrics` (e.g. the base model's evaluation) is logged as step 0."""
        cfg, log_cfg = self.cfg, self.cfg.log
        if resume:
            self.resume()
            self.engine.load_weights()  # the engine samples the checkpoint's weights, not the initial ones
        # Resuming drops the records after the checkpoint; with no checkpoint yet (killed before the first
        # one) that is every record, step 0 included, since step 0 is logged again just below.
        logger = MetricsLogger(self.run_dir, log_cfg.tensorboard,  # only rank 0 writes files
                               resume_step=(self.step_idx if self.step_idx > 0 else -1) if resume else None) \
            if dist.is_main() else NullLogger()
        records = []
        if self.step_idx == 0 and (initial_metrics or self.evaluate is not None):
            logger.log({"step": 0, **(initial_metrics or self._eval_metrics())})
        bar = progress_bar(range(self.step_idx, cfg.grpo.steps), desc="grpo", enabled=log_cfg.progress and dist.is_main(),
                           initial=self.step_idx, total=cfg.grpo.steps)
        for _ in bar:
            record, batch = self.step()
            record["peak_memory_mb"] = self.policy.peak_memory_mb()
            if self.step_idx == 1 or not records:
                record.update({f"params/{k}": v for k, v in self.policy.parameter_counts().items()})
            if self._due(cfg.eval.every) and self.evaluate is not None:
                record.update(self._eval_metrics())
            if log_cfg.sample_every and (self.step_idx % log_cfg.sample_every == 0 or self.step_idx == 1):
                logger.log_samples(self.step_idx, self._samples(batch))
            logger.log(record)
            records.append(record)
            bar.set_postfix({k: f"{record[key]:.3g}" for k, key in POSTFIX.items() if key in record})
            if self._due(log_cfg.save_every):
                self.save()
        logger.close()
        if dist.is_main():
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png", CURVE_PANELS)
        return records

    def _due(self, every: int) -> bool:
        return self.step_idx == self.cfg.grpo.steps or (every > 0 and self.step_idx % every == 0)

    def step(self) -> tuple[dict[str, Any], StepBatch]:
        """One GRPO step (see the module doc). Returns its metrics record and the batch it trained on."""
        g, times, t0 = self.cfg.grpo, {}, time.perf_counter()
        self._round = 0
        sampled, sampling = collect_groups(lambda: self.sample(times), g.prompts_per_step, dynamic=g.dynamic_sampling,
                                           max_tries=g.max_sampling_tries, pad_id=self.tokenizer.pad_token_id)
        ro = sampled.rollout
        with _timed(times, "logprobs"):
            old, entropy = self.old_policy_logprobs(ro)  # [N, Tc], [N, Tc] or None
            ref = self.reference_logprobs(ro) if g.beta > 0 else None  # [N, Tc]; beta = 0 never runs it
        scores = self.policy.to_device(sampled.scores.total)  # [N] rewards are computed on the CPU
        rewards = scores - self.kl_penalty(old, ref, ro.completion_mask)  # [N]
        # advantages over the GLOBAL batch (whole groups per rank: identical to local ones for group-wise
        # advantages, and batch-wide normalisations such as REINFORCE++'s see every rank's rows)
        rewards_all = dist.all_gather_rows(rewards)  # [N * world] rank-major = prompt-major
        mine = dist.share(len(rewards_all), "grpo.prompts_per_step")
        advantages = compute_advantages(rewards_all, g.group_size, g.advantage)[mine]  # [N]
        batch = StepBatch(sampled.problems, ro, sampled.texts, sampled.scores, rewards, advantages, old,
                          self.loss_mask(ro, entropy), ref_logprobs=ref, sampling=sampling,
                          sampler_logprobs=ro.logprobs if g.recompute_old_logprobs else None)
        with _timed(times, "update"):
            # dynamic sampling found no group with a spread of rewards: nothing to learn from, skip
            update_metrics = self.update(batch) if sampling.informative else {}
        if sampling.informative:
            with _timed(times, "sync"):
                self.engine.load_weights()  # next rollouts sample the new weights (vLLM: in place; local: no-op)
        self.step_idx += 1
        elapsed = time.perf_counter() - t0
        record = {"step": self.step_idx, **self._global_batch_metrics(batch), **update_metrics,
                  **{f"time/{k}": v for k, v in times.items()}, "time/step": elapsed,
                  "tokens_per_s": sampling.generated_tokens / elapsed}
        return record, batch

    # ---- phases --------------------------------------------------------------------------------
    def sample(self, times: dict[str, float]) -> Sampled:
        """One sampling round: `prompts_per_step` fresh problems, G completions each, scored."""
        g = self.cfg.grpo
        with _timed(times, "generate"):
            problems = self.task.train_problems(g.prompts_per_step, self.py_rng)  # the global draw, on every rank
            mine = dist.share(len(problems), "grpo.prompts_per_step")  # this rank's whole groups
            problems = problems[mine]
            rollout, texts = self.generate(problems, first_group=mine.start)
            self._round += 1
        with _timed(times, "score"):
            # each row gets its own copy of its problem carrying its token length (for "overlong")
            expanded = with_completion_lengths([p for p in problems for _ in range(g.group_size)], rollout.lengths,
                                               rollout.truncated, g.max_new_tokens, self.overlong_buffer)
            scores = score_completions(texts, expanded, g.reward_weights)
        return Sampled(problems, rollout, texts, scores)

    def generate(self, problems: list[Problem], first_group: int = 0) -> tuple[Rollout, list[str]]:
        """G completions per problem; `first_group` is the global index of problems[0] (per-group streams)."""
        g = self.cfg.grpo
        prompts = [self.tokenizer(render_prompt(p.question, self.cfg.task.template, self.tokenizer)).input_ids
                   for p in problems]
        opts = dict(group_size=g.group_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)
        with dist.full_params(self.model):  # FSDP2: the engine samples from the gathered full weights
            if self.group_streams:
                seeds = [dist.stream_seed(self.cfg.seed, "group", self.step_idx, self._round, first_group + i)
                         for i in range(len(prompts))]
                rollout = generate_groups(self.engine, prompts, seeds, self.policy.generator,
                                          pad_id=self.tokenizer.pad_token_id, **opts)
            else:
                rollout = self.engine.generate(prompts, generator=self.generator, **opts)
        return rollout, decode_completions(self.tokenizer, rollout)

    def old_policy_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pi_old, the ratio's denominator [N, Tc], and the entropy [N, Tc] when the high-entropy mask needs it.

        pi_old is the sampler's logprobs unless `recompute_old_logprobs` (then the sampler's feed the
        mismatch metric and TIS); one forward of the policy serves the recomputation and the entropy.
        With `fuse_old_logprobs` no forward runs here: the result is a copy of the sampler's logprobs that
        `update` overwrites, micro-batch by micro-batch, with its forward's own logprobs, detached (rows it
        does not train, with grpo.skip_zero_advantage or a skipped update, keep the sampler's).
        """
        g = self.cfg.grpo
        if self.fuse_old_logprobs:
            return rollout.logprobs.clone(), None
        if not g.recompute_old_logprobs and g.entropy_top_fraction is None:
            return rollout.logprobs, None
        logprobs, entropy = self._forward(self.model, rollout, with_entropy=g.entropy_top_fraction is not None)
        return (logprobs if g.recompute_old_logprobs else rollout.logprobs), entropy

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        with self.policy.reference() as ref:  # LoRA: the same network, adapters disabled
            return self._forward(ref, rollout)[0]

    @torch.no_grad()
    def _forward(self, model, rollout: Rollout, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprobs (and entropies) [N, Tc] of the rollout's completions under `model`, micro-batched."""
        logprobs = torch.zeros_like(rollout.logprobs)  # [N, Tc]
        entropy = torch.zeros_like(rollout.logprobs) if with_entropy else None  # [N, Tc]
        for idx in self._micro_batches(rollout.num_rows):
            with self.policy.autocast():
                lp, ent, tc = completion_logprobs(model, rollout, idx, self.cfg.grpo.temperature,
                                                  packed=self.cfg.grpo.packed_update, with_entropy=with_entropy)
            logprobs[idx, :tc] = lp
            if entropy is not None:
                entropy[idx, :tc] = ent
        return logprobs, entropy

    def kl_penalty(self, logprobs: torch.Tensor, ref: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """beta * sum_t KL_t per completion [N] to subtract from the rewards (kl_mode="reward"), else 0."""
        g = self.cfg.grpo
        beta = g.beta * KL_MODES[g.kl_mode][1]
        if ref is None or beta == 0:
            return torch.zeros(mask.shape[0], device=mask.device)
        return kl_reward_penalty(logprobs, ref, mask, beta=beta, estimator=g.kl_estimator)

    def loss_mask(self, rollout: Rollout, entropy: torch.Tensor | None) -> torch.Tensor:
        """The tokens that train [N, Tc]: every generated one, minus truncated rows (`overlong_mask`,
        DAPO overlong filtering) and minus all but the top `entropy_top_fraction` of token entropies
        (Wang et al. 2025), a threshold taken over the FULL batch, not per micro-batch."""
        g = self.cfg.grpo
        mask = rollout.completion_mask  # [N, Tc]
        if g.overlong_mask:
            mask = mask_truncated_rows(mask, rollout.truncated)
        if g.entropy_top_fraction is not None:
            mask = mask * high_entropy_mask(entropy, mask, g.entropy_top_fraction).to(mask.dtype)
        return mask

    def update(self, batch: StepBatch) -> dict[str, float]:
        """mu optimizer steps over the whole batch, each accumulating gradients over micro-batches."""
        g, ro, mu = self.cfg.grpo, batch.rollout, self.cfg.grpo.updates_per_batch
        # the FULL batch's normaliser, summed over ranks: accumulation over micro-batches and ranks is exact
        denominator = dist.all_reduce_sum(agg_denominator(batch.loss_mask, g.agg_mode))
        rows = self._update_rows(batch)  # None: every row; else the rows whose gradient can be non-zero
        tokens = float(dist.all_reduce_sum(batch.loss_mask.sum() if rows is None else batch.loss_mask[rows].sum()))
        acc: dict[str, float] = {} if rows is None else {"update_rows_frac": rows.numel() / ro.num_rows}
        self.model.train()
        for _ in range(mu):
            self.optimizer.zero_grad(set_to_none=True)
            micro = self._micro_batches(ro.num_rows, rows)
            for j, idx in enumerate(micro):
                with dist.grad_sync(self.policy.model, j == len(micro) - 1), self.policy.autocast():  # DDP: last syncs
                    logprobs, entropy, tc = completion_logprobs(self.policy.model, ro, idx, g.temperature,
                                                                packed=g.packed_update, with_entropy=True,
                                                                entropy_grad=g.entropy_coef != 0)
                part = lambda x: None if x is None else x[idx, :tc]  # noqa: E731  [B, tc] slice of an [N, Tc]
                old = part(batch.old_logprobs)  # [B, tc]
                if self.fuse_old_logprobs:  # mu = 1: pi_old is this very forward (the same numbers a separate
                    old = logprobs.detach()  # no-grad forward gives), so TIS and the mismatch metric use it too
                    batch.old_logprobs[idx, :tc] = old
                loss, m = policy_objective(
                    logprobs, old, batch.advantages[idx], part(batch.loss_mask),
                    ref_logprobs=part(batch.ref_logprobs), sampler_logprobs=part(batch.sampler_logprobs),
                    loss_type=g.loss_type, agg_mode=g.agg_mode, clip_low=g.clip_low, clip_high=g.clip_high,
                    clip_ratio_c=g.clip_ratio_c, beta=g.beta * KL_MODES[g.kl_mode][0], kl_estimator=g.kl_estimator,
                    entropy=entropy, entropy_coef=g.entropy_coef, tis_cap=g.tis_cap, norm_const=g.max_new_tokens,
                    denominator=denominator,
                )
                with dist.grad_sync(self.policy.model, j == len(micro) - 1):
                    loss.backward()
                share = float(batch.loss_mask[idx].sum()) / tokens if tokens else 0.0  # token-weighted means
                _accumulate(acc, {**m, "loss": loss.detach()}, share / mu, 1.0 / mu)
            if not micro:  # every row skipped: the full computation's gradient is exactly 0, and AdamW must
                # still see it (a None grad would skip the parameter: no moment decay, no step count)
                self._zero_grads()
                _accumulate(acc, {"loss": 0.0, "pg_loss": 0.0}, 0.0, 1.0 / mu)
            grad_norm = self.policy.clip_grad_norm(g.grad_clip)
            _accumulate(acc, {"grad_norm": grad_norm}, 1.0 / mu, 1.0 / mu)
            self.optimizer.step()
        self.model.eval()
        # each rank's shares are of the global token count: summing over ranks gives the global means
        return dist.reduce_metrics(acc, summed=[k for k in acc if k != "grad_norm"])

    def _micro_batches(self, n: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Row indices of each micro-batch: 0..n-1 in order, or only `rows` (ascending) when given."""
        size = max(1, self.cfg.grpo.micro_batch_size)
        if rows is not None:
            return list(rows.to(self.policy.device).split(size)) if rows.numel() else []  # split of [] is ([],)
        return [torch.arange(i, min(n, i + size), device=self.policy.device) for i in range(0, n, size)]

    def _update_rows(self, batch: StepBatch) -> torch.Tensor | None:
        """With `grpo.skip_zero_advantage`: the rows (ascending) that can have a gradient, a non-zero
        advantage and at least one loss token. Every other row's loss terms are advantage x (ratio or its
        clip) x mask, exactly 0, so its gradient is exactly 0 (check_grpo_options rules out the KL-in-loss and
        entropy terms that would not be); the normaliser still counts the full batch. None: train every row."""
        if not self.cfg.grpo.skip_zero_advantage:
            return None
        keep = (batch.advantages != 0) & (batch.loss_mask.sum(-1) > 0)  # [N]
        return keep.nonzero().squeeze(1)

    def _zero_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    # ---- metrics, evaluation, checkpoints -------------------------------------------------------
    def _batch_metrics(self, batch: StepBatch) -> dict[str, float]:
        ro, g, s, adv = batch.rollout, self.cfg.grpo, batch.sampling, batch.advantages
        lengths = ro.lengths.float()
        grouped = batch.rewards.view(-1, g.group_size)  # [P, G] what the advantages saw
        out = batch.scores.means()
        out.update({
            "reward_std": batch.scores.total.std().item() if batch.scores.total.numel() > 1 else 0.0,
            "completion_len_mean": lengths.mean().item(), "completion_len_max": lengths.max().item(),
            "truncated_frac": ro.truncated.float().mean().item(),
            "reflection_rate": sum(map(has_reflection, batch.texts)) / len(batch.texts),
            "zero_adv_group_frac": (grouped.max(1).values == grouped.min(1).values).float().mean().item(),
            "adv_mean": adv.mean().item(), "adv_std": adv.std().item() if adv.numel() > 1 else 0.0,
            "adv_abs_mean": adv.abs().mean().item(),
            "loss_token_frac": (batch.loss_mask.sum() / ro.completion_mask.sum().clamp(min=1)).item(),
            "kept_groups": len(batch.problems), "sampling_tries": s.tries, "dropped_groups": s.dropped_groups,
            "sampled_reward": s.sampled_reward, "skipped_update": float(not s.informative),
        })
        if g.beta * KL_MODES[g.kl_mode][1] > 0:
            out["kl_penalty_mean"] = (batch.scores.total - batch.rewards).mean().item()
        return out

    def _global_batch_metrics(self, batch: StepBatch) -> dict[str, float]:
        """`_batch_metrics` of the global batch: row means weighted over ranks, maxima by max, spreads
        from every rank's rows (in one process: `_batch_metrics`)."""
        out = self._batch_metrics(batch)
        if dist.world() == 1:
            return out
        out = dist.reduce_metrics(out, weight=batch.rollout.num_rows, summed=("kept_groups", "dropped_groups"))
        total, adv = dist.all_gather_rows(batch.scores.total), dist.all_gather_rows(batch.advantages)  # [N * world]
        out.update({"reward_std": total.std().item(), "adv_mean": adv.mean().item(), "adv_std": adv.std().item(),
                    "adv_abs_mean": adv.abs().mean().item()})
        return out

    def _eval_metrics(self) -> dict[str, float]:
        """Held-out evaluation on rank 0 (FSDP2: from the gathered weights); every rank gets the result."""
        with dist.full_params(self.model):
            out = {f"eval/{k}": v for k, v in self.evaluate(self.engine, self.step_idx).items()} if dist.is_main() else {}
        return dist.broadcast_object(out)

    def _samples(self, batch: StepBatch) -> list[dict[str, Any]]:
        n, G = self.cfg.log.num_samples, self.cfg.grpo.group_size
        rows = list(range(0, batch.rollout.num_rows, max(1, batch.rollout.num_rows // max(1, n))))[:n]
        return [{"problem": batch.problems[r // G].question, "answer": batch.problems[r // G].answer,
                 "completion": batch.texts[r], "reward": round(float(batch.scores.total[r]), 4)} for r in rows]

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (full tensors, gathered first under FSDP2: every rank calls this)."""
        weights = dist.full_state_dict(self.model) if dist.is_sharded(self.model) else None  # collective
        state = {"step": self.step_idx, "optimizer": dist.full_optimizer_state(self.model, self.optimizer),
                 "rng": rng_state(self.py_rng, self.generator)}
        path = self.run_dir / "checkpoints"
        if dist.is_main():
            path = save_checkpoint(path, self.step_idx, self.policy, state, yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
                                   keep=self.cfg.log.keep_checkpoints, state_dict=weights)
        dist.barrier()
        return path

    def resume(self) -> int:
        """Load the latest checkpoint under run_dir/checkpoints (weights, optimizer, RNG, step), if any;
        returns the step it restored (0 when there is none)."""
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            return self.step_idx
        self.policy.load_weights(ckpt / "model")  # full weights, or the adapter with LoRA
        state = load_trainer_state(ckpt)
        dist.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        restore_rng(state["rng"], self.py_rng, self.generator)
        self.step_idx = state["step"]
        return self.step_idx


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts without the EOS/pad tokens (the reasoning tags are ordinary text and stay)."""
    out = []
    for ids, mask in zip(rollout.completion_ids, rollout.completion_mask):
        out.append(tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True))
    return out


def micro_inputs(rollout: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows `idx` as one forward input [B, Tp' + Tc'], trimmed of all-padding columns."""
    pm, cm = rollout.prompt_mask[idx], rollout.completion_mask[idx]
    tc = int(cm.sum(-1).max().item()) or 1
    first = int((pm.sum(0) > 0).nonzero()[0].item()) if pm.any() else 0
    ids = torch.cat([rollout.prompt_ids[idx, first:], rollout.completion_ids[idx, :tc]], dim=1)  # [B, T]
    mask = torch.cat([pm[:, first:], cm[:, :tc].long()], dim=1)  # [B, T]
    return ids, mask, tc
