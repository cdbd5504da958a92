"""Typed configs: dataclass defaults -> YAML file -> `key=value` overrides.

One source of truth per knob. Every key is checked: an unknown key or a value of the wrong type is an
`R1KitError` naming the key (dotted path), the value and what was expected. The resolved config is
saved as YAML in each run folder and checkpoint (`save_config`).
"""
from __future__ import annotations

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
    arch: str = "llama"  # llama | qwen2 (tiny models only)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    vocab_size: int = 384  # target size of the locally trained BPE tokenizer
    dtype: str = "float32"  # float32 | bfloat16


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the task factory
    template: str = "r1_zero"


@dataclass
class PretrainConfig:
    """Stage 0: the tiny base model, pretrained from scratch on a synthetic corpus."""

    output_dir: str = ""  # "" = <run dir>/base; reused when it already holds a complete model
    corpus_docs: int = 40000
    direct_frac: float = 0.7  # share of short direct answers (systematically wrong on carries)
    reflect_frac: float = 0.1  # share of worked solutions that start direct, then self-check
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_problems: int = 200


@dataclass
class GRPOConfig:
    steps: int = 150
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
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    kl_estimator: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None
    loss_type: str = "grpo"
    agg_mode: str = "seq-mean-token-mean"
    advantage: str = "grpo"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})


@dataclass
class EvalConfig:
    num_problems: int = 200
    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 96
    every: int = 25  # held-out evaluation every N RL steps (0 = only before and after)


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


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for p in path[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise R1KitError(f"override {'.'.join(path)!r}: {p!r} is not a section")
        node = child
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
        _merge(data, keys, value)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    from r1kit.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
