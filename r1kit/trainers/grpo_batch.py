"""Batch assembly for one GRPO step: the typed batch, group-wise selection/concatenation of sampled
groups, and DAPO dynamic sampling.

Dynamic sampling (Yu et al. 2025, DAPO section 3.2): a group whose G rewards are all equal has zero
advantage everywhere, so it adds no policy gradient and only shrinks the effective batch. With it on,
each round samples `prompts_per_step` fresh prompts, keeps the groups with a spread of rewards, and
rounds repeat until `target` informative groups are gathered (surplus ones are discarded, as DAPO does)
or `max_tries` rounds are spent; then the step trains on what it has, or skips the update when no
group was informative. Rows stay prompt-major throughout (row p*G + g).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from r1kit.algorithms import nonconstant_groups
from r1kit.rewards.functions import RewardScores
from r1kit.types import Problem, Rollout


@dataclass
class Sampled:
    """P prompts' groups, generated and scored: everything one sampling round produced."""

    problems: list[Problem]  # [P]
    rollout: Rollout  # N = P*G rows
    texts: list[str]  # [N] decoded completions
    scores: RewardScores  # total [N], per function [N]

    @property
    def num_groups(self) -> int:
        return len(self.problems)

    def select(self, groups: list[int]) -> Sampled:
        """The groups with these prompt indices, in this order."""
        G = self.rollout.group_size
        rows = torch.tensor([p * G + g for p in groups for g in range(G)], dtype=torch.long)  # [P'*G]
        ro = self.rollout
        sub = Rollout(ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows], ro.completion_mask[rows],
                      ro.logprobs[rows], ro.truncated[rows], G)
        scores = RewardScores(self.scores.total[rows], {k: v[rows] for k, v in self.scores.per_fn.items()})
        return Sampled([self.problems[p] for p in groups], sub, [self.texts[r] for r in rows.tolist()], scores)


@dataclass
class SamplingStats:
    tries: int  # sampling rounds run this step
    sampled_groups: int  # groups generated over all rounds
    dropped_groups: int  # groups with all-equal rewards left out (dynamic sampling only)
    generated_tokens: int  # completion tokens generated over all rounds
    sampled_reward: float  # mean total reward over every row generated, kept or not
    informative: bool  # False: no group had a spread of rewards; the step skips its update


@dataclass
class StepBatch:
    """Everything one GRPO step feeds the update. Rows prompt-major: row p*G + g."""

    problems: list[Problem]  # [P]
    rollout: Rollout  # N = P*G rows
    texts: list[str]  # [N] decoded completions
    scores: RewardScores  # the reward functions' scores: total [N] + per function [N]
    rewards: torch.Tensor  # [N] what the advantages were computed from: scores.total minus any KL penalty
    advantages: torch.Tensor  # [N]
    old_logprobs: torch.Tensor  # [N, Tc] the ratio's denominator: sampler's, or the trainer's recomputation
    # (GRPOTrainer.fuse_old_logprobs: filled in by the update, from its own forward)
    loss_mask: torch.Tensor  # [N, Tc] float: completion mask minus overlong rows / low-entropy tokens
    ref_logprobs: torch.Tensor | None = None  # [N, Tc], None when beta == 0
    sampler_logprobs: torch.Tensor | None = None  # [N, Tc] the engine's, only when old ones were recomputed
    sampling: SamplingStats | None = None


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts row-wise, re-padding prompts on the left and completions on the right."""
    if len(parts) == 1:
        return parts[0]
    G = parts[0].group_size
    if any(p.group_size != G for p in parts):
        raise ValueError(f"cannot concatenate rollouts of group sizes {[p.group_size for p in parts]}")
    tp = max(p.prompt_ids.shape[1] for p in parts)
    tc = max(p.completion_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        prompt_ids=torch.cat([pad(p.prompt_ids, tp, pad_id, True) for p in parts]),  # [N, Tp]
        prompt_mask=torch.cat([pad(p.prompt_mask, tp, 0, True) for p in parts]),  # [N, Tp]
        completion_ids=torch.cat([pad(p.completion_ids, tc, pad_id, False) for p in parts]),  # [N, Tc]
        completion_mask=torch.cat([pad(p.completion_mask, tc, 0.0, False) for p in parts]),  # [N, Tc]
        logprobs=torch.cat([pad(p.logprobs, tc, 0.0, False) for p in parts]),  # [N, Tc]
        truncated=torch.cat([p.truncated for p in parts]),  # [N]
        group_size=G,
    )


def concat_sampled(parts: list[Sampled], pad_id: int) -> Sampled:
    names = list(parts[0].scores.per_fn)
    scores = RewardScores(torch.cat([p.scores.total for p in parts]),
                          {k: torch.cat([p.scores.per_fn[k] for p in parts]) for k in names})
    return Sampled([q for p in parts for q in p.problems], concat_rollouts([p.rollout for p in parts], pad_id),
                   [t for p in parts for t in p.texts], scores)


def collect_groups(
    sample: Callable[[], Sampled], target: int, *, dynamic: bool, max_tries: int, pad_id: int
) -> tuple[Sampled, SamplingStats]:
    """Call `sample()` once, or (dynamic) until `target` groups with a spread of rewards are kept or
    `max_tries` rounds are spent. Returns the batch (at most `target` groups) and what it took.

    With dynamic sampling and no informative group at all, the last round is returned as is (for
    metrics and samples) with `informative=False`, and the caller skips the update.
    """
    kept: list[Sampled] = []
    rewards: list[torch.Tensor] = []
    tries = dropped = tokens = 0
    last = None
    while tries < (max_tries if dynamic else 1):
        last = sample()
        tries += 1
        rewards.append(last.scores.total)
        tokens += int(last.rollout.completion_mask.sum())
        if not dynamic:
            kept.append(last)
            break
        spread = nonconstant_groups(last.scores.total, last.rollout.group_size)  # [P] bool
        dropped += int((~spread).sum())
        if spread.any():
            kept.append(last.select(spread.nonzero().squeeze(1).tolist()))
        if sum(k.num_groups for k in kept) >= target:
            break
    all_rewards = torch.cat(rewards)  # [tries * N]
    stats = SamplingStats(tries, tries * last.num_groups, dropped, tokens, float(all_rewards.mean()), bool(kept))
    if not kept:
        return last, stats
    batch = concat_sampled(kept, pad_id)
    return (batch.select(list(range(target))) if batch.num_groups > target else batch), stats


def generate_groups(engine, prompts: list[list[int]], seeds: list[int], make_generator: Callable[[int], torch.Generator],
                    *, group_size: int, max_new_tokens: int, temperature: float, top_p: float, pad_id: int) -> Rollout:
    """Sample each prompt's group from its own random stream, seeded by `seeds[i]`, so a group's samples do
    not depend on which other groups share the batch, or on which rank draws it: the rollout of a
    data-parallel job is then the same as one process's (`grpo.rollout_seeds=group`). Through the engine's
    request API (one request with n = G and its own seed per group, batched together by the scheduler); an
    engine without one gets one `generate` call per group with `make_generator(seed)`."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not callable(getattr(engine, "add_request", None)):
        parts = [engine.generate([ids], group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, generator=make_generator(seed)) for ids, seed in zip(prompts, seeds)]
        return concat_rollouts(parts, pad_id)
    from r1kit.engine.api import SamplingParams

    G = group_size
    index = {engine.add_request(ids, SamplingParams(n=G, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                                    seed=seed)): p for p, (ids, seed) in enumerate(zip(prompts, seeds))}
    tokens: list[list[int]] = [[] for _ in range(len(prompts) * G)]  # row p*G + k
    logprobs: list[list[float]] = [[] for _ in range(len(prompts) * G)]
    stopped = [False] * (len(prompts) * G)
    while engine.has_unfinished():
        for out in engine.step():
            row = index[out.request_id] * G + out.index
            tokens[row] += out.token_ids
            logprobs[row] += out.logprobs
            stopped[row] = out.finished and out.finish_reason == "stop"
    ro = _rollout_of(prompts, tokens, logprobs, stopped, G, pad_id)
    dev = getattr(engine, "device", None)  # where the engine's own rollouts live (the policy's device)
    if dev is None or torch.device(dev) == ro.prompt_ids.device:
        return ro
    return Rollout(*(t.to(dev) for t in (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                          ro.logprobs, ro.truncated)), G)


def _rollout_of(prompts: list[list[int]], tokens: list[list[int]], logprobs: list[list[float]], stopped: list[bool],
                G: int, pad_id: int) -> Rollout:
    """A Rollout (prompts left-padded, completions right-padded; rows p*G + k) from per-sample token lists."""
    tp, tc = max(map(len, prompts)), max(1, max(map(len, tokens)))
    prompt_ids = torch.full((len(prompts), tp), pad_id, dtype=torch.long)  # [P, Tp]
    prompt_mask = torch.zeros((len(prompts), tp), dtype=torch.long)  # [P, Tp]
    for p, ids in enumerate(prompts):
        prompt_ids[p, tp - len(ids):], prompt_mask[p, tp - len(ids):] = torch.tensor(ids), 1
    completion_ids = torch.full((len(tokens), tc), pad_id, dtype=torch.long)  # [N, Tc]
    completion_mask = torch.zeros((len(tokens), tc))  # [N, Tc]
    lps = torch.zeros((len(tokens), tc))  # [N, Tc]
    for r, (ids, lp) in enumerate(zip(tokens, logprobs)):
        completion_ids[r, : len(ids)], completion_mask[r, : len(ids)], lps[r, : len(lp)] = torch.tensor(ids, dtype=torch.long), 1.0, torch.tensor(lp)
    return Rollout(prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0), completion_ids,
                   completion_mask, lps, ~torch.tensor(stopped), G)
