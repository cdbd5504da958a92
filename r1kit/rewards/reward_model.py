"""Any Hugging Face sequence-classification checkpoint as a reward function.

    scorer = RewardModelScorer("runs/r1-tiny/rm/model")                       # num_labels == 1
    scorer.score(["User: hi\\nAssistant:"], [" <think> </think> <answer> hi </answer>"])   # -> [0.93]
    register_reward_model("runs/r1-tiny/rm/model", scenarios=("general",))   # REWARD_FUNCS["reward_model"]

DeepSeek-R1's last RL stage (section 2.3.4) scores reasoning prompts with rules and general prompts with
reward models. `register_reward_model` puts a scorer into the reward registry, so a GRPO config names it
in `reward_weights` like any rule. With `scenarios`, only problems whose `meta["scenario"]` is one of them
are scored (the others get 0.0, a constant that leaves group advantages unchanged): that is how one run
mixes rule-rewarded and model-rewarded prompts without the trainer knowing.

The prompt the reward model sees is `render_prompt(problem.question, template)`: the text the policy saw.
The model uses its own tokenizer (it need not share the policy's). Scores are the raw logit, or its
sigmoid with normalize="sigmoid" (the default: a probability-like score in [0, 1], on the scale of the
rule rewards it is summed with).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from r1kit.rewards import register_reward
from r1kit.templates import render_prompt
from r1kit.types import Problem, R1KitError

NORMALIZERS = {"none": lambda x: x, "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x))}


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a one-output `...ForSequenceClassification` checkpoint."""

    def __init__(self, path: str | Path, *, template: str = "r1_zero", batch_size: int = 32,
                 normalize: str = "sigmoid", dtype: str = "float32", device: str = "auto"):
        from transformers import AutoConfig

        from r1kit.model import load_classifier, load_tokenizer
        from r1kit.policy import resolve_device

        p = Path(path)
        if not (p / "config.json").exists():
            raise R1KitError(f"reward model {str(p)!r} is not a Hugging Face model folder (no config.json)")
        config = AutoConfig.from_pretrained(str(p))
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise R1KitError(f"reward model {str(p)!r} is a {archs or config.model_type}, not a sequence classifier "
                             "(train one with `r1kit rm`)")
        if config.num_labels != 1:
            raise R1KitError(f"reward model {str(p)!r} has num_labels={config.num_labels}; a reward model has exactly 1")
        if normalize not in NORMALIZERS:
            raise R1KitError(f"reward model normalize={normalize!r}; expected one of {sorted(NORMALIZERS)}")
        self.model = load_classifier(p, dtype).to(resolve_device(device)).eval()
        self.tokenizer = load_tokenizer(p)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        render_prompt("", template)  # an unknown template fails now, not at the first RL step
        self.path, self.template, self.batch_size, self.normalize = p, template, batch_size, normalize

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One score per (prompt, completion), in order."""
        if len(prompts) != len(completions):
            raise R1KitError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up")
        out: list[float] = []
        norm = NORMALIZERS[self.normalize]
        for i in range(0, len(prompts), self.batch_size):
            r = rewards_of(self.model, self.tokenizer, list(prompts[i : i + self.batch_size]),
                           list(completions[i : i + self.batch_size]))
            out += [norm(float(v)) for v in r]
        return out

    def __call__(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        """The batch reward form: each completion scored against its problem's rendered prompt."""
        return self.score([render_prompt(p.question, self.template) for p in problems], completions)


def encode_texts(tokenizer, prompts: list[str], completions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt ids + completion ids + EOS per row, right-padded; rows longer than `max_len` lose their
    *start* (the score is read at the end). Returns input_ids, attention_mask: [N, T] long."""
    rows = []
    for p, c in zip(prompts, completions):
        ids = tokenizer(p, add_special_tokens=False).input_ids + tokenizer(c, add_special_tokens=False).input_ids
        rows.append((ids + [tokenizer.eos_token_id])[-max_len:])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [N, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def rewards_of(model, tokenizer, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Scalar reward r(x, y) per (prompt, completion): [N] float32 on the model's device (with gradients if
    enabled). `model` is a one-output sequence classifier (or a wrapper of one)."""
    config = getattr(model, "config", None) or model.module.config
    ids, mask = encode_texts(tokenizer, prompts, completions, getattr(config, "max_position_embeddings", 2048))
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits  # [N, 1]
    if logits.shape[-1] != 1:
        raise R1KitError(f"reward model has {logits.shape[-1]} outputs; a reward model has exactly one (num_labels=1)")
    return logits[:, 0].float()


def register_reward_model(path: str | Path, name: str = "reward_model", *, scenarios: Sequence[str] | None = None,
                          template: str = "r1_zero", normalize: str = "sigmoid") -> RewardModelScorer:
    """Register the checkpoint at `path` as reward `name`; with `scenarios`, only problems whose
    meta["scenario"] is listed are scored (others 0.0). Returns the scorer (re-registering replaces it)."""
    scorer = RewardModelScorer(path, template=template, normalize=normalize)
    wanted = None if scenarios is None else frozenset(scenarios)

    def applies(p: Problem) -> bool:
        return wanted is None or p.meta.get("scenario") in wanted

    def batch(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        rows = [i for i, p in enumerate(problems) if applies(p)]
        scores = [0.0] * len(completions)
        if rows:
            for i, s in zip(rows, scorer([completions[i] for i in rows], [problems[i] for i in rows])):
                scores[i] = s
        return scores

    def single(completion: str, problem: Problem) -> float:
        return batch([completion], [problem])[0]

    register_reward(name, batch=batch)(single)
    return scorer
