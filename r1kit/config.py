"""Typed configs: dataclass defaults -> YAML file -> `key=value` overrides.

One source of truth per knob. Every key is checked: an unknown key or a value of the wrong type is an
`R1KitError` naming the key (dotted path), the value and what was expected. The resolved config is
saved as YAML in each run folder and checkpoint (`save_config`).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from r1kit.types import R1KitError

T = TypeVar("T")


@dataclass
class ModelConfig:
    path: str | None = None  # an HF causal-LM folder; None = build the tiny model below from scratch
    arch: str = "llama"  # tiny models: llama | qwen2 | qwen3 | mistral | gemma | phi3 | gpt2 (r1kit.model.TINY_ARCHS)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    vocab_size: int = 384  # target size of the locally trained BPE tokenizer
    dtype: str = "float32"  # float32 | bfloat16 (the weights' storage type)
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N  (r1kit.policy)
    mixed_precision: str = "fp32"  # fp32 | bf16: bf16 autocast in training forwards, fp32 master weights
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time


@dataclass
class LoraConfig:
    """LoRA adapters through peft (the `lora` extra) for SFT, GRPO and the reward model; r = 0 is off.
    The reference model is then the same network with its adapters disabled, and checkpoints hold the
    adapter only (`r1kit export --merge` writes a merged HF folder)."""

    r: int = 0  # adapter rank; 0 = full fine-tuning
    alpha: float = 16.0  # scaling alpha / r
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # module names, or ["all-linear"]


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    options: dict[str, Any] = field(default_factory=lambda: {"min_digits": 3, "max_digits": 3})  # passed to the task factory
    template: str = "r1_zero"


@dataclass
class PretrainConfig:
    """Stage 0: the tiny base model, pretrained from scratch on a synthetic corpus."""

    output_dir: str = ""  # "" = <run dir>/base; reused when it already holds a complete model
    corpus_docs: int = 60000
    direct_frac: float = 0.6  # share of short direct answers (systematically wrong on carries)
    reflect_frac: float = 0.1  # share of worked solutions that start direct, then self-check
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    # Length bucketing: `bucket_pool` batches drawn at once, sorted and cut by document length (1 = plain random
    # batches). On zero-tiny 8 pads 1.5x less per step, but its bases sampled the worked style less often
    # (readiness scores 0.145-0.32 against 0.40-0.47 with plain batches), so it is off by default.
    bucket_pool: int = 1
    # Packed batches (r1kit/trainers/packed_forward.py): the documents' tokens without padding through the
    # projections and MLPs, attention within each document, the LM head at predicting tokens only. The same
    # batches, order and token weights as padded batches; losses and gradients equal up to float rounding.
    # Llama-family models only (others use the padded forward, with a warning).
    packed: bool = False
    # Readiness gate (0 = off: one `steps`-long cosine cycle, whatever the result). R1-Zero needs a base
    # that is right *sometimes*, and whether a tiny model picks up the worked procedure in a fixed budget
    # varies with the seed. With the gate on, at the end of a cycle the model is sampled on `gate_problems`
    # fresh training problems (never held-out ones) as GRPO will sample them; below `gate_pass1`:
    #   gate_action "restart": pretrain again on a new corpus draw, from a new initialisation, in a new batch
    #     order (seed + 7907 k for attempt k), `steps` long, while the steps of all attempts stay within
    #     `max_steps`; the attempt with the best check is kept;
    #   gate_action "extend": another cosine cycle of `extend_steps` on the same model (a warm restart at
    #     peak lr x `restart_lr_scale` ** cycle) while the total stays within `max_steps`.
    # Measured on zero-tiny (benchmarks/results/zero_seeds.md): seed 1's base, at 1.6% after 2,500 steps, crept
    # to 14.5% in two more cycles; on a fresh attempt its second base scored 44%, and RL took it to 100%.
    gate_pass1: float = 0.0
    # A second condition of the same check (0 = off): pass@1 among the samples that reason (a chain of thought
    # of at least 16 characters, r1kit.recipes.zero.REASONED_MIN_CHARS), 8 per problem at the evaluation's
    # temperature and top-p (the model's systematic errors, not sampling noise), must reach this. r1-tiny's seed-1 base
    # passed the pass@1 gate (0.109) on its direct answers while its worked solutions restated the question
    # wrongly 73% of the time (right on 0.27 of them, against 0.99 and 0.62 on seeds 0 and 2), and every later
    # stage inherited the miscopy (benchmarks/results/r1_observations.md section 8).
    gate_reasoned_pass1: float = 0.0
    gate_problems: int = 64
    gate_action: str = "restart"
    extend_steps: int = 1000
    max_steps: int = 5000
    restart_lr_scale: float = 1.0


@dataclass
class GRPOConfig:
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_batch: int = 1  # mu in the paper
    micro_batch_size: int = 64  # rows per forward/backward (gradient accumulation)
    # Training forwards (update, recomputed old / reference logprobs) without padding, each prompt run once
    # per group and the LM head only at completion tokens (r1kit/trainers/packed_forward.py): the same
    # logprobs and gradients up to float rounding. Llama-family models only; others use the padded forward.
    packed_update: bool = False
    # Rows whose advantage is exactly 0 skip the update's forward/backward: with no KL in the loss and no
    # entropy bonus their gradient is exactly 0, so the update is the same (token metrics cover trained rows).
    skip_zero_advantage: bool = False
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    kl_estimator: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None
    loss_type: str = "grpo"
    agg_mode: str = "seq-mean-token-mean"
    advantage: str = "grpo"
    entropy_coef: float = 0.0
    tis_cap: float | None = None  # truncated importance sampling cap; needs recompute_old_logprobs
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    # "loss": + beta * KL(pi || pi_ref) in the objective (R1 eq. 1); "reward": beta * sum_t KL_t is
    # subtracted from each completion's reward before advantages (REINFORCE++). beta = 0: no reference.
    kl_mode: str = "loss"
    recompute_old_logprobs: bool = False  # old logprobs from a trainer forward; the sampler's feed TIS/mismatch
    entropy_top_fraction: float | None = None  # train only on the top fraction of high-entropy tokens
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards, sample more prompts
    max_sampling_tries: int = 4  # generation rounds per step at most when dynamic_sampling is on
    overlong_mask: bool = False  # DAPO overlong filtering: truncated completions leave the loss
    overlong_buffer: int | None = None  # tokens of the "overlong" reward's ramp; None = max_new_tokens // 5
    # A name from GRPO_PRESETS: its values replace the defaults; keys written in the YAML file or given
    # as key=value win over it (mapping keys such as reward_weights merge entry by entry). Applied when
    # the config is read (load_config / from_dict), not by GRPOConfig(preset=...) in Python.
    preset: str | None = None
    # Rollout random streams: "batch" = one generator for the step's whole batch (the single-process default),
    # "group" = one stream per prompt group keyed by (seed, step, group index), so which rank samples a group
    # does not change its samples (1 process == N ranks); "auto" = "group" when running on several ranks.
    rollout_seeds: str = "auto"


# Published GRPO-family variants as GRPOConfig values. Precedence: dataclass default < preset <
# YAML file / `key=value` override. Sources and our departures are in r1kit/trainers/grpo.py's docstring.
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    "grpo_paper": {"advantage": "grpo", "loss_type": "grpo", "agg_mode": "seq-mean-token-mean",
                   "clip_low": 0.2, "clip_high": 0.2, "kl_mode": "loss", "kl_estimator": "k3", "beta": 0.04},
    "dr_grpo": {"advantage": "dr_grpo", "loss_type": "grpo", "agg_mode": "seq-mean-token-sum-norm",
                "clip_low": 0.2, "clip_high": 0.2, "beta": 0.0},
    "dapo": {"advantage": "grpo", "loss_type": "grpo", "agg_mode": "token-mean", "clip_low": 0.2,
             "clip_high": 0.28, "beta": 0.0, "dynamic_sampling": True, "overlong_mask": True,
             "reward_weights": {"overlong": 1.0}},
    "gspo": {"advantage": "grpo", "loss_type": "gspo", "agg_mode": "seq-mean-token-mean",
             "clip_low": 3e-4, "clip_high": 4e-4, "beta": 0.0},
    "rloo": {"advantage": "rloo", "loss_type": "reinforce", "agg_mode": "seq-mean-token-sum", "beta": 0.0},
    "reinforce_pp": {"advantage": "reinforce_pp_baseline", "loss_type": "grpo", "agg_mode": "token-mean",
                     "clip_low": 0.2, "clip_high": 0.2, "kl_mode": "reward", "kl_estimator": "k1",
                     "beta": 0.001},
}


@dataclass
class EvalConfig:
    num_problems: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 96
    every: int = 20  # held-out evaluation every N RL steps (0 = only before and after)


@dataclass
class LogConfig:
    log_every: int = 1
    sample_every: int = 10  # write sample completions every N steps
    num_samples: int = 4
    save_every: int = 50  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2
    tensorboard: bool = True  # used when tensorboard is installed
    progress: bool = True


@dataclass
class SFTConfig:
    """`r1kit sft`: supervised fine-tuning on chat JSONL, loss on completion tokens only (r1kit.trainers.sft)."""

    data: str = ""  # JSONL of {"messages": [...]} or {"prompt", "completion"}; "" = the pipeline's data
    init: str = ""  # model folder to start from; "" = the pipeline's parent (the base model)
    epochs: int = 2
    max_steps: int = 0  # > 0 caps the optimizer steps
    seq_len: int = 256  # packed row length in tokens (several examples per row, block-diagonal attention)
    micro_batch_size: int = 8  # packed rows per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 1
    cold_start_examples: int = 2000  # pipeline stage cold_sft: chains of thought by the reference solvers


@dataclass
class SampleConfig:
    """`r1kit sample`: rejection sampling from a checkpoint into SFT data (r1kit.recipes.sampling)."""

    model: str = ""  # checkpoint to sample from; "" = the pipeline's reasoning-RL model
    num_prompts: int = 500  # training prompts (never held-out ones)
    samples_per_prompt: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96
    min_tokens: int = 4  # length bounds of a kept completion, in tokens (truncated ones never kept)
    max_tokens: int = 96
    max_repetition: float = 0.3  # highest share of repeated word 4-grams in a kept completion
    max_per_prompt: int = 2  # distinct completions kept per prompt
    general_frac: float = 0.2  # share of non-reasoning examples (answered without a chain of thought)


@dataclass
class RewardModelConfig:
    """`r1kit rm`: a Bradley-Terry reward model on preference pairs (r1kit.trainers.reward_model)."""

    data: str = ""  # JSONL of {"prompt", "chosen", "rejected"}; "" = synthetic pairs on general prompts
    init: str = ""  # HF causal-LM or sequence-classification folder; "" = the pipeline's SFT model (stage sft)
    pairs: int = 1000  # synthetic pairs written when data is ""
    # Synthetic pairs' rejection kinds, cycled in these proportions (r1kit.recipes.sampling.preference_records):
    # a wrong value (one digit changed), malformed output, a repeated answer.
    kind_weights: dict[str, int] = field(default_factory=lambda: {"wrong_value": 1, "malformed": 1, "repeated": 1})
    # Pairs from the policy's own samples (pipeline stage rm): the SFT model answers `policy_prompts` general
    # training prompts `policy_samples` times at `policy_temperature`; each distinct wrong answer is rejected
    # against the right one (kind "policy_wrong"), added to the synthetic pairs. 0 = synthetic pairs only.
    policy_prompts: int = 0
    policy_samples: int = 8
    policy_temperature: float = 1.0
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_frac: float = 0.1  # held-out share of pairs for the pairwise accuracy


@dataclass
class StudentModelConfig(ModelConfig):
    """The distilled student: a smaller tiny model (its own defaults, so a partial override keeps them).
    It shares the teacher's tokenizer, so `vocab_size` is unused."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 192


@dataclass
class DistillConfig:
    """`r1kit distill`: teacher traces that pass rejection sampling, SFT of a smaller student on them."""

    teacher: str = ""  # "" = the pipeline's final R1 model
    student: StudentModelConfig = field(default_factory=StudentModelConfig)
    student_init: str = ""  # a pretrained student folder; "" = pretrain one on the base corpus
    student_pretrain_steps: int = 0  # 0 = pretrain.steps
    num_prompts: int = 1000  # teacher prompts; samples_per_prompt and filters come from `sample`
    rl_steps: int = 0  # student RL-only comparison: 0 = as many as fit in distillation's wall-clock time
    rl_max_steps: int = 400  # cap for the wall-clock mode


PIPELINE_STAGES = ["base", "zero", "cold_sft", "reason_rl", "reason_rl_nolang", "sample", "sft", "rm", "rl_all",
                   "student_base", "distill", "student_rl"]


@dataclass
class PipelineConfig:
    """`r1kit pipeline`: the multi-stage R1 recipe and distillation (r1kit.recipes.r1)."""

    stages: list[str] = field(default_factory=lambda: list(PIPELINE_STAGES))
    lang: str = "en"  # target language of the reasoning: language reward, unmixed filter
    corpus_zh_frac: float = 0.0  # base corpus: share of worked solutions with Chinese step words
    corpus_mix_frac: float = 0.0  # base corpus: share of worked solutions switching language mid-way
    # Base corpus: general documents ("Repeat 4721" answered directly), this many per reasoning document, added
    # to the corpus (a real base model has seen non-reasoning text; the SFT data alone did not teach copying).
    corpus_general_frac: float = 0.0
    # Digits of the general prompts' numbers, [min, max] ("Repeat 4721"). With 3-5 digits the SFT policies copied
    # the number right on 0.1-0.7% of samples and stage 4 had nothing to reinforce (r1_observations.md section 8).
    general_digits: list[int] = field(default_factory=lambda: [3, 5])
    language_weight: float = 1.0  # weight of the language reward in reasoning RL (paper: summed with accuracy)
    rm_weight: float = 1.0  # weight of the reward model's score (general prompts) in the all-scenario RL stage
    general_frac: float = 0.25  # share of general (non-reasoning) prompts in the all-scenario RL stage
    general_test: int = 50  # held-out general prompts evaluated after each stage
    # Readiness gate of the SFT stages (cold_sft, sft; 0 = off): after training, the model is sampled at the eval
    # settings on `sft_gate_problems` fresh training problems; below `sft_gate_pass1` another attempt trains
    # sft.epochs more with a new batch order, from the last attempt's model ("extend") or from the stage's
    # initial model ("restart"), up to `sft_max_attempts` in all; the attempt with the best check is kept.
    sft_gate_pass1: float = 0.0
    sft_gate_problems: int = 64
    sft_gate_action: str = "extend"
    sft_max_attempts: int = 3
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> {section: {key: value}}


@dataclass
class EngineConfig:
    """The generation engine every stage samples with (r1kit.engine.make_engine)."""

    backend: str = "local"  # local (r1kit's own engine) | vllm (in-process vllm.LLM, the `vllm` extra)
    max_num_seqs: int = 256  # running sample slots (continuous batching)
    cache_mb: float = 256.0  # prefix-cache budget in MiB
    # the dtype the engine samples in: auto (the model's own) | bf16 | fp32. The local engine's fast path
    # samples with cached copies of the weights in it (bf16 sampling beside fp32 master weights); GRPO
    # with a sampler dtype other than the training precision needs grpo.recompute_old_logprobs=true
    dtype: str = "auto"


@dataclass
class DistConfig:
    """Data parallel under torchrun (r1kit.dist): batch sizes stay global, each rank takes a disjoint share."""

    strategy: str = "ddp"  # ddp | fsdp2 (torch fully_shard per decoder layer: params, grads, optimizer state sharded)


@dataclass
class RunConfig:
    name: str = "zero-tiny"
    seed: int = 0
    output_dir: str = "runs"
    threads: int = 0  # torch threads; 0 = all cores
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` (int -> float allowed) or raise naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except R1KitError as e:
                errors.append(str(e))
        raise R1KitError(f"config key {key!r}: {value!r} is not a {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise R1KitError(f"config key {key!r}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise R1KitError(f"config key {key!r}: expected a list, got {value!r}")
        (et,) = typing.get_args(tp)
        return [_check_type(v, et, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise R1KitError(f"config key {key!r}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and ill-typed values are errors."""
    if not isinstance(data, dict):
        raise R1KitError(f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {data!r}")
    if cls is GRPOConfig and isinstance(data.get("preset"), str):
        data = _with_preset(data, prefix)
    if cls is RunConfig:
        data = _with_backend_defaults(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise R1KitError(f"unknown config key {key!r}; allowed keys here: {sorted(names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v if v is not None else {}, key + ".")
        else:
            kwargs[k] = _check_type(v, tp, key)
    return cls(**kwargs)


# engine.backend=vllm samples with another forward than the trainer's (other kernels, maybe another dtype), so
# the old-policy logprobs are recomputed by the trainer and token-level TIS corrects the gap, unless these keys
# are set in the file or on the command line (README "vLLM backend").
BACKEND_GRPO_DEFAULTS: dict[str, dict[str, Any]] = {"vllm": {"recompute_old_logprobs": True, "tis_cap": 2.0}}


def _with_backend_defaults(data: dict[str, Any]) -> dict[str, Any]:
    engine, grpo = data.get("engine"), data.get("grpo")
    backend = engine.get("backend") if isinstance(engine, dict) else None
    if backend not in BACKEND_GRPO_DEFAULTS or not isinstance(grpo, (dict, type(None))):
        return data
    return {**data, "grpo": {**BACKEND_GRPO_DEFAULTS[backend], **(grpo or {})}}


def _with_preset(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The section's keys laid over its preset's values: every key given explicitly wins, and a
    mapping value (reward_weights) is merged key by key, so a preset can add a reward to the file's."""
    name = data["preset"]
    if name not in GRPO_PRESETS:
        raise R1KitError(f"config key {prefix + 'preset'!r}: unknown preset {name!r}; known presets: "
                         f"{sorted(GRPO_PRESETS)}")
    merged = dict(GRPO_PRESETS[name])
    for k, v in data.items():
        both_maps = isinstance(v, dict) and isinstance(merged.get(k), dict)
        merged[k] = {**merged[k], **v} if both_maps else v
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], parsed c). The value is parsed as YAML ("3" -> 3, "null" -> None)."""
    if "=" not in text:
        raise R1KitError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise R1KitError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise R1KitError(f"override {text!r}: value is not valid YAML: {e}") from e
    return key.strip().split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any, cls: type | None = None) -> None:
    """Set `path` to `value` in the nested dict `base`. Descending into a mapping-valued field that `base`
    does not set yet (e.g. `grpo.reward_weights.format=0.2`) starts from that field's default, so the
    override changes one key instead of dropping the others; config sections start empty as before."""
    node, owner = base, cls
    for p in path[:-1]:
        tp = typing.get_type_hints(owner).get(p) if owner is not None and dataclasses.is_dataclass(owner) else None
        if p not in node and tp is not None and not dataclasses.is_dataclass(tp) and typing.get_origin(tp) is dict:
            node[p] = copy.deepcopy(getattr(owner(), p))
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise R1KitError(f"override {'.'.join(path)!r}: {p!r} is not a section")
        node, owner = child, tp if tp is not None and dataclasses.is_dataclass(tp) else None
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise R1KitError(f"config file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise R1KitError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise R1KitError(f"config file {str(p)!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """defaults -> YAML file (optional) -> `key=value` overrides, all type-checked."""
    data = load_yaml(path) if path is not None else {}
    for o in overrides:
        keys, value = parse_override(o)
        _merge(data, keys, value, cls)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    from r1kit.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
