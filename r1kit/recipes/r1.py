"""The multi-stage DeepSeek-R1 recipe, and distillation, as one resumable pipeline (`r1kit pipeline`).

    r1kit pipeline r1-tiny                  # every stage, in order; rerun after a kill to continue
    r1kit sft|sample|rm|distill CONFIG ...  # one stage (its inputs from finished stages or the config)

Stages (paper section 2.3; each writes runs/<name>/<stage>/ and, last, an atomic done.json):

    base              stage 0: the tiny base model pretrained on the synthetic corpus; with
                      pipeline.corpus_zh_frac/mix_frac its worked solutions come in English and Chinese;
                      pipeline.corpus_general_frac adds general documents ("Repeat N" answered directly)
    zero              R1-Zero for comparison: GRPO from base, rule rewards (r1kit.recipes.zero.run_zero)
    cold_sft          1. cold start: SFT of base on readable chains of thought by the reference solvers
    reason_rl         2. reasoning RL from cold_sft: accuracy + format + language consistency
    reason_rl_nolang     (ablation: the same RL without the language reward)
    sample            3. rejection sampling from reason_rl, plus non-reasoning examples
    sft               3. SFT of *base* on that data
    rm                4. a reward model (Bradley-Terry) for general prompts, from the SFT model (r1kit.recipes.r1_all)
    rl_all            4. RL for all scenarios from sft: rules on reasoning prompts, the reward model on general ones
    student_base      distillation: a smaller student pretrained on the same corpus (r1kit.recipes.distill)
    distill           teacher (rl_all) traces that pass rejection sampling -> SFT of the student
    student_rl        the same student trained by RL alone with distillation's wall-clock budget

Lineage: done.json records the stage's identity (a hash of the config keys it reads and of its parents'
identities), its parents, the data files it read with their sha256, its outputs and its held-out
evaluation (pass@1, cons@k, format, language mixing, length). A finished stage is skipped when its
identity matches and refused (with the reason) when it does not; an unfinished stage folder of another
identity is cleared. Inside a stage, SFT and RL resume from their atomic checkpoints, data files are
written atomically and reused, so a kill anywhere loses at most the work since the last checkpoint.
Bad input (a missing parent, no data left after filtering) stops the pipeline naming the stage and cause.
Readiness gates: stage 0 with pretrain.gate_pass1 (r1kit.recipes.zero.pretrain_base: a new draw below it);
cold_sft and sft with pipeline.sft_gate_pass1 (r1kit.recipes.r1_gate: more epochs below it); done.json
records every attempt's check.

Per-stage settings: `pipeline.overrides: {stage: {section: {key: value}}}` on top of the shared sections.
Departures from the paper, by scale: one synthetic reasoning task, "general" prompts are "Repeat N", and
the reward model learns preference labels written by a rule it never sees.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from r1kit import dist
from r1kit.config import PIPELINE_STAGES, RunConfig, from_dict, to_dict
from r1kit.io import atomic_dir, atomic_write_json, atomic_write_text
from r1kit.recipes.r1_report import results_table
from r1kit.types import Problem, R1KitError

READABILITY_KEYS = ("readability", "fixed_format_rate", "repetition_rate")  # r1kit.evaluation.readability
EVAL_KEYS = ("pass1", "cons", "format_rate", "no_answer_rate", "reflection_rate", "mean_length")
ALWAYS_HASHED = ("seed", "task")
SFT_GATE_KEYS = ("pipeline.sft_gate_pass1", "pipeline.sft_gate_problems", "pipeline.sft_gate_action", "pipeline.sft_max_attempts")


# ----------------------------------------------------------------------------- stages and their context


@dataclass(frozen=True)
class Stage:
    name: str
    parents: tuple[str, ...]  # stages whose outputs it reads
    keys: tuple[str, ...]  # config keys (dotted) that define it, hashed into its identity
    fn: Callable[["StageContext"], dict[str, Any]]  # does the work; returns its outputs for done.json
    explicit: Callable[[RunConfig], dict[str, str]]  # parent -> a path given in the config instead


STAGES: dict[str, Stage] = {}


def register_stage(name: str, *, parents: tuple[str, ...] = (), keys: tuple[str, ...] = (),
                   explicit: Callable[[RunConfig], dict[str, str]] | None = None):
    if name not in PIPELINE_STAGES:
        raise ValueError(f"stage {name!r} is not in config.PIPELINE_STAGES")

    def deco(fn):
        STAGES[name] = Stage(name, parents, keys, fn, explicit or (lambda cfg: {}))
        return fn

    return deco


@dataclass
class StageContext:
    """What a stage function gets: its resolved config, folders and parents' records."""

    name: str
    cfg: RunConfig  # pipeline.overrides[name] applied
    root: Path  # runs/<name>
    dir: Path  # runs/<name>/<stage>
    parents: dict[str, dict[str, Any]]  # parent stage -> its done.json record
    explicit: dict[str, str]  # parent stage -> a path given in the config instead of that stage
    seed: int
    inputs: list[dict[str, str]] = field(default_factory=list)  # data files read, with sha256

    def model(self, parent: str) -> Path:
        """The model folder produced by `parent` (or given in the config instead)."""
        path = Path(self.explicit[parent]) if parent in self.explicit else self.resolve(self.parents[parent]["model"])
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():  # full or LoRA
            raise R1KitError(f"model {str(path)!r} (from {parent!r}) is not a Hugging Face model folder")
        return path

    def data(self, parent: str) -> Path:
        """The data file produced by `parent` (or given in the config instead); recorded as an input."""
        path = Path(self.explicit[parent]) if parent in self.explicit else self.resolve(self.parents[parent]["data"])
        if not path.is_file():
            raise R1KitError(f"data file {str(path)!r} (from {parent!r}) not found")
        self.record_input(path)
        return path

    def record_input(self, path: Path) -> None:
        self.inputs.append({"path": str(path), "sha256": sha256_file(path)})

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder when inside it (a moved run folder stays valid)."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    def resolve(self, stored: str) -> Path:
        p = Path(stored)
        return p if p.is_absolute() else self.root / p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str) -> str:
    """A file's sha256; for a folder, a hash of its file names, sizes and config.json (cheap for big models)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise R1KitError(f"input path {path!r} does not exist")
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
    if (p / "config.json").exists():
        h.update((p / "config.json").read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- config per stage


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_config(cfg: RunConfig, stage: str) -> RunConfig:
    """`cfg` with `pipeline.overrides[stage]` applied (type-checked like any config)."""
    unknown = sorted(set(cfg.pipeline.overrides) - set(PIPELINE_STAGES))
    if unknown:
        raise R1KitError(f"pipeline.overrides names unknown stages {unknown}; stages: {PIPELINE_STAGES}")
    over = cfg.pipeline.overrides.get(stage) or {}
    if not over:
        return cfg
    if not isinstance(over, dict) or "pipeline" in over:
        raise R1KitError(f"pipeline.overrides.{stage}: expected {{section: {{key: value}}}} (not the pipeline section)")
    try:
        return from_dict(RunConfig, _deep_merge(to_dict(cfg), over))
    except R1KitError as e:
        raise R1KitError(f"pipeline.overrides.{stage}: {e}") from e


def config_value(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node


def stage_identity(cfg: RunConfig, stage: Stage, parents: dict[str, dict], explicit: dict[str, str]) -> tuple[str, str]:
    """(config hash, identity): the hash of the keys the stage reads; that plus its inputs' identities."""
    keys = {k: _hashed_value(k, config_value(cfg, k)) for k in (*ALWAYS_HASHED, *stage.keys)
            if not _inert(k, config_value(cfg, k))}
    if cfg.lora.r > 0 and {k.split(".")[0] for k in stage.keys} & {"grpo", "sft", "rm"}:  # a training stage
        keys["lora"] = config_value(cfg, "lora")  # hashed only when on: full fine-tuning identities are unchanged
    config_hash = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]
    lineage = {"config": config_hash, "parents": {p: r["identity"] for p, r in sorted(parents.items())},
               "explicit": {p: fingerprint(v) for p, v in sorted(explicit.items())}}
    return config_hash, hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


# Settings inert while their switch is off are hashed only when it is on, so stages finished before they
# existed keep their identity across an upgrade (section -> (switch, keys)).
DORMANT_KEYS = {"pretrain": ("gate_pass1", ("gate_pass1", "gate_problems", "gate_action", "extend_steps", "max_steps",
                                            "restart_lr_scale", "gate_reasoned_pass1")),
                "rm": ("policy_prompts", ("policy_prompts", "policy_samples", "policy_temperature"))}

# Settings added after stages were finished, left out of the hash while at this inert value, whether a stage
# reads the key itself or its whole section, so those stages keep their identity.
INERT_DEFAULTS = {"pipeline.corpus_general_frac": 0.0, "pipeline.general_digits": [3, 5], "pretrain.gate_reasoned_pass1": 0.0}


def _inert(key: str, value: Any) -> bool:
    return key in INERT_DEFAULTS and INERT_DEFAULTS[key] == value


def _hashed_value(key: str, value: Any) -> Any:
    switch, dormant = DORMANT_KEYS.get(key, ("", ()))
    if isinstance(value, dict):
        return {k: v for k, v in value.items()
                if not (dormant and not value.get(switch) and k in dormant) and not _inert(f"{key}.{k}", v)}
    return value


def stage_seed(cfg: RunConfig, stage: str) -> int:
    return cfg.seed * 1000 + PIPELINE_STAGES.index(stage)


# ----------------------------------------------------------------------------- running stages


def read_done(stage_dir: Path) -> dict[str, Any] | None:
    if not (f := Path(stage_dir) / "done.json").exists():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # cannot happen with atomic writes, unless edited by hand
        raise R1KitError(f"{f} is not valid JSON ({e}); delete it to rerun that stage") from e


def _claim(stage_dir: Path, identity: str) -> None:
    """Mark an unfinished stage folder as ours; clear it first when it was started with another identity."""
    marker = stage_dir / "stage.json"
    if marker.exists() and json.loads(marker.read_text()).get("identity") != identity:
        shutil.rmtree(stage_dir)
    atomic_write_json(marker, {"identity": identity})


def run_stage(cfg: RunConfig, name: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage (or skip it when finished); returns its done.json record."""
    if name not in STAGES:
        raise R1KitError(f"unknown stage {name!r}; stages: {PIPELINE_STAGES}")
    stage, scfg = STAGES[name], stage_config(cfg, name)
    root, sdir = cfg.run_dir, cfg.run_dir / name
    explicit = {k: v for k, v in stage.explicit(scfg).items() if v}
    parents = {}
    for p in stage.parents:
        if p in explicit:
            continue
        rec = read_done(root / p)
        if rec is None:
            raise R1KitError(f"stage {name!r}: its input stage {p!r} is not finished ({root / p / 'done.json'} is "
                             f"missing); run it first (`r1kit pipeline` runs the stages in order)")
        parents[p] = rec
    config_hash, identity = stage_identity(scfg, stage, parents, explicit)
    done = read_done(sdir)
    if done is not None:
        if done.get("identity") != identity:
            raise R1KitError(f"stage {name!r} in {sdir} was finished with another config or other inputs (identity "
                             f"{done.get('identity')} there, {identity} now); delete that folder or use another run name")
        log(f"[{name}] done already, skipped")
        return done
    sdir.mkdir(parents=True, exist_ok=True)
    _claim(sdir, identity)
    atomic_write_text(sdir / "config.yaml", yaml.safe_dump(to_dict(scfg), sort_keys=False, allow_unicode=True))
    seed = stage_seed(cfg, name)
    torch.manual_seed(seed)
    if scfg.threads > 0:
        torch.set_num_threads(scfg.threads)
    ctx = StageContext(name, scfg, root, sdir, parents, explicit, seed)
    log(f"[{name}] running")
    t0 = time.time()
    try:
        outputs = stage.fn(ctx)
    except R1KitError as e:
        raise R1KitError(f"stage {name!r}: {e}") from e
    record = {"stage": name, "identity": identity, "config_hash": config_hash,
              "parents": {p: {"identity": r["identity"], "dir": p} for p, r in parents.items()},
              "explicit_inputs": explicit, "inputs": ctx.inputs, **outputs, "seconds": time.time() - t0,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(sdir / "done.json", record)
    log(f"[{name}] done in {record['seconds']:.0f}s")
    return record


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Every stage of `pipeline.stages`, in pipeline order; writes runs/<name>/{config.yaml, pipeline.md}."""
    unknown = [s for s in cfg.pipeline.stages if s not in PIPELINE_STAGES]
    if unknown:
        raise R1KitError(f"pipeline.stages: unknown stages {unknown}; stages: {PIPELINE_STAGES}")
    check_stage_settings(cfg)
    root = cfg.run_dir
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    records = {}
    for name in [s for s in PIPELINE_STAGES if s in cfg.pipeline.stages]:
        records[name] = run_stage(cfg, name, log)
    atomic_write_text(root / "pipeline.md", results_table(records, cfg))
    return records


def check_stage_settings(cfg: RunConfig) -> None:
    """The settings that the stages would otherwise check only when they start, checked before the first one
    runs: a bad value for a late stage must not cost the hour of stages before it."""
    from r1kit.engine.inputs import engine_dtype
    from r1kit.recipes.r1_gate import validate_gate
    from r1kit.recipes.sampling import general_task, kind_cycle, validate_sample_config

    engine_dtype(cfg.engine.dtype, torch.float32)  # every stage samples: a bad engine.dtype fails now
    general_task(cfg)  # the general prompts' digits (every stage evaluates them)
    stages = set(cfg.pipeline.stages)
    for name in stages & {"cold_sft", "sft"}:
        validate_gate(stage_config(cfg, name).pipeline)
    for name in stages & {"sample", "distill"}:
        validate_sample_config(stage_config(cfg, name).sample)
    if "rm" in stages and not (rm := stage_config(cfg, "rm").rm).data:
        kind_cycle(rm.kind_weights)
        if rm.policy_prompts < 0 or (rm.policy_prompts and (rm.policy_samples < 1 or not rm.policy_temperature > 0)):
            raise R1KitError(f"rm.policy_prompts must be >= 0, and with it rm.policy_samples >= 1 and "
                             f"rm.policy_temperature > 0; got {rm.policy_prompts}, {rm.policy_samples}, {rm.policy_temperature}")


# ----------------------------------------------------------------------------- shared stage pieces


class RLTask:
    """The task a reasoning-RL stage trains on: the reasoning problems stamped with the target language
    (read by the "language" reward) and, with `general_frac`, general prompts whose answer is hidden so
    that only the reward model scores them (r1kit.recipes.sampling.hide_answer)."""

    def __init__(self, reasoning, lang: str, general=None, general_frac: float = 0.0):
        if not 0 <= general_frac < 1 or (general_frac > 0 and general is None):
            raise R1KitError(f"pipeline.general_frac must be in [0, 1) (with general prompts), got {general_frac}")
        self.reasoning, self.lang, self.general, self.general_frac = reasoning, lang, general, general_frac
        self.name = getattr(reasoning, "name", "task")

    def _stamp(self, p: Problem) -> Problem:
        return replace(p, meta={**p.meta, "lang": self.lang})

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        from r1kit.recipes.sampling import hide_answer

        n_general = round(n * self.general_frac) if self.general is not None else 0
        out = [self._stamp(p) for p in self.reasoning.train_problems(n - n_general, rng)]
        return out + [self._stamp(hide_answer(p)) for p in (self.general.train_problems(n_general, rng) if n_general else [])]

    def test_problems(self) -> list[Problem]:
        return [self._stamp(p) for p in self.reasoning.test_problems()]


def reasoning_task(cfg: RunConfig):
    from r1kit.tasks import make_task

    return make_task(cfg.task.name, **cfg.task.options)


def evaluate_model(ctx: StageContext, model_dir: Path) -> dict[str, float]:
    """Held-out evaluation of a stage's model: pass@1 over k samples, cons@k, format, language mixing,
    length and readability (r1kit.evaluation.readability: reasoning -> summary -> answer, not repetitive,
    one language) on the reasoning task (and pass@1 on held-out general prompts). Same seed for every stage,
    so stages are compared on the same problems and sampler streams."""
    from r1kit.evaluation import evaluate_problems
    from r1kit.evaluation.readability import readability
    from r1kit.policy import Policy
    from r1kit.recipes.sampling import general_task
    from r1kit.rewards.language import language_consistency, mixing_rate, off_target_rate

    cfg, e, lang = ctx.cfg, ctx.cfg.eval, ctx.cfg.pipeline.lang
    policy = Policy.from_config(cfg, model_dir, lora=False)  # a LoRA stage's adapter folder loads merged
    tok, engine = policy.tokenizer, policy.make_engine(backend=cfg.engine.backend, dtype=cfg.engine.dtype)
    common = dict(k=e.k, temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                  template=cfg.task.template, seed=cfg.seed + 7919)
    problems = reasoning_task(cfg).test_problems()[: e.num_problems]
    s = evaluate_problems(engine, tok, problems, out_dir=ctx.dir / "eval", **common)
    texts = [r.completion for r in s.records]
    out = {k: float(s.to_dict()[k]) for k in EVAL_KEYS}
    out.update(mixing_rate=mixing_rate(texts), off_target_rate=off_target_rate(texts, lang),
               language_consistency=sum(language_consistency(t, lang) for t in texts) / len(texts))
    out.update({k: v for k, v in readability(texts, lang).items() if k in READABILITY_KEYS})
    if cfg.pipeline.general_test > 0:
        general = general_task(cfg).test_problems()
        out["general_pass1"] = evaluate_problems(engine, tok, general, out_dir=ctx.dir / "eval_general", **common).pass1
    return out


def pretrain_stage_model(ctx: StageContext, model_cfg, out: Path, *, steps: int, tokenizer=None,
                         gate: bool = True) -> dict[str, Any]:
    """Stage 0's pretraining (r1kit.recipes.zero.pretrain_base, with its readiness gate unless `gate` is
    False) on the pipeline's possibly bilingual corpus into `out`; a finished one is reused."""
    from r1kit.recipes.zero import pretrain_base

    if (out / "pretrain.json").exists():
        return json.loads((out / "pretrain.json").read_text())
    pl, cfg = ctx.cfg.pipeline, ctx.cfg
    if not gate:
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, gate_pass1=0.0))
    info = pretrain_base(cfg, out, reasoning_task(cfg), model_cfg=model_cfg, init_seed=ctx.seed,
                         steps=steps, tokenizer=tokenizer, zh_frac=pl.corpus_zh_frac, mix_frac=pl.corpus_mix_frac,
                         general_frac=pl.corpus_general_frac,
                         show_progress=ctx.cfg.log.progress)
    return {k: v for k, v in info.items() if k != "log"}


def rl_stage(ctx: StageContext, init: Path, task, weights: dict[str, float], *, budget_s: float | None = None,
             max_steps: int | None = None) -> dict[str, Any]:
    """GRPO from `init` with `weights` into ctx.dir (checkpoints, metrics, model/), then evaluate.
    With `budget_s`, trains until that many seconds of RL steps (at most `max_steps`) instead of grpo.steps."""
    from r1kit.io import read_jsonl
    from r1kit.policy import Policy
    from r1kit.trainers.grpo import GRPOTrainer

    cfg = ctx.cfg
    rcfg = replace(cfg, grpo=replace(cfg.grpo, reward_weights=dict(weights), steps=max_steps or cfg.grpo.steps))
    if not (ctx.dir / "rl.json").exists():
        policy = Policy.from_config(cfg, init)
        trainer = GRPOTrainer(rcfg, policy, task, ctx.dir)
        t0 = time.time()
        if budget_s is None:
            trainer.train(resume=True)
        else:
            train_for_budget(trainer, budget_s, ctx.dir / "budget.json")
        with atomic_dir(ctx.dir / "model") as tmp:
            policy.save(tmp)
        last = [r for r in read_jsonl(ctx.dir / "metrics.jsonl") if "reward" in r][-5:]
        means = {k: sum(r[k] for r in last) / len(last) for k in last[-1] if k.startswith("reward")} if last else {}
        atomic_write_json(ctx.dir / "rl.json", {"steps": trainer.step_idx, "reward_weights": weights, "budget_s": budget_s,
                                                "seconds_this_run": time.time() - t0, "last_rewards": means})
    return {"model": ctx.rel(ctx.dir / "model"), "init": ctx.rel(init), "rl": json.loads((ctx.dir / "rl.json").read_text()),
            "eval": evaluate_model(ctx, ctx.dir / "model")}


def train_for_budget(trainer, budget_s: float, state_path: Path) -> None:
    """RL steps until `budget_s` seconds of steps are spent (or grpo.steps are done), checkpointing every
    log.save_every steps with the seconds spent so far, so a resumed run keeps the same budget.
    Uses GRPOTrainer's step, save and resume."""
    from r1kit.logger import MetricsLogger

    trainer.resume()
    spent = json.loads(state_path.read_text())["seconds"] if state_path.exists() and trainer.step_idx else 0.0
    logger = MetricsLogger(trainer.run_dir, tensorboard=False, resume_step=trainer.step_idx)
    every = max(1, trainer.cfg.log.save_every)
    while trainer.step_idx < trainer.cfg.grpo.steps and spent < budget_s:
        t = time.time()
        record, _ = trainer.step()
        spent += time.time() - t
        logger.log({**record, "budget/spent_s": spent})
        if trainer.step_idx % every == 0:
            trainer.save()
            atomic_write_json(state_path, {"step": trainer.step_idx, "seconds": spent})
    trainer.save()
    atomic_write_json(state_path, {"step": trainer.step_idx, "seconds": spent})
    logger.close()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------- the R1 stages


@register_stage("base", keys=("model", "pretrain", "pipeline.corpus_zh_frac", "pipeline.corpus_mix_frac",
                              "pipeline.corpus_general_frac", "eval",
                              "pipeline.lang", "pipeline.general_test", "pipeline.general_digits"))
def stage_base(ctx: StageContext) -> dict[str, Any]:
    """Stage 0: the base model (pretrained here unless model.path names one)."""
    if ctx.cfg.model.path:
        model = Path(ctx.cfg.model.path)
        ctx.record_input(model / "config.json")
        info: dict[str, Any] = {"given": str(model)}
    else:
        model = ctx.dir / "model"
        info = pretrain_stage_model(ctx, ctx.cfg.model, model, steps=ctx.cfg.pretrain.steps)
    return {"model": ctx.rel(model), "pretrain": info, "eval": evaluate_model(ctx, model)}


@register_stage("zero", parents=("base",), keys=("grpo", "eval", "pipeline.lang", "pipeline.general_test", "pipeline.general_digits"))
def stage_zero(ctx: StageContext) -> dict[str, Any]:
    """R1-Zero from the base model with rule rewards only: r1kit.recipes.zero.run_zero, in this folder.
    (A config may add the "language" reward to grpo.reward_weights for the R1-Zero + language ablation.)"""
    import r1kit.rewards.language  # noqa: F401  registers "language", should a config name it
    from r1kit.recipes.zero import run_zero

    cfg = ctx.cfg
    zcfg = replace(cfg, name=ctx.dir.name, output_dir=str(ctx.root), model=replace(cfg.model, path=str(ctx.model("base"))))
    if not (ctx.dir / "summary.json").exists():
        run_zero(zcfg, resume=True)
    summary = json.loads((ctx.dir / "summary.json").read_text())
    return {"model": ctx.rel(ctx.dir / "final"), "rl": {"steps": summary["steps"], "seconds": summary["seconds"]},
            "eval": evaluate_model(ctx, ctx.dir / "final")}


@register_stage("cold_sft", parents=("base",), keys=("sft", "eval", "pipeline.lang", "pipeline.general_test", "pipeline.general_digits", *SFT_GATE_KEYS),
                explicit=lambda c: {"base": c.sft.init})
def stage_cold_sft(ctx: StageContext) -> dict[str, Any]:
    """Stage 1: SFT of the base model on cold-start chains of thought written by the reference solvers."""
    from r1kit.recipes.sampling import cold_start_records

    cfg, data = ctx.cfg, ctx.dir / "data.jsonl"
    if not data.exists():
        recs = cold_start_records(reasoning_task(cfg), cfg.sft.cold_start_examples, random.Random(ctx.seed),
                                  lang=cfg.pipeline.lang, template=cfg.task.template)
        write_jsonl(data, recs)
    ctx.record_input(data)
    return sft_stage(ctx, ctx.model("base"), data, gated=True)


def _rl_weights(cfg: RunConfig, language: bool, reward_model: bool = False) -> dict[str, float]:
    """grpo.reward_weights plus the stage's own rewards (language consistency, the reward model)."""
    return {**cfg.grpo.reward_weights, **({"language": cfg.pipeline.language_weight} if language else {}),
            **({"reward_model": cfg.pipeline.rm_weight} if reward_model else {})}


@register_stage("reason_rl", parents=("cold_sft",), keys=("grpo", "eval", "pipeline.lang", "pipeline.language_weight",
                                                          "pipeline.general_test", "pipeline.general_digits"))
def stage_reason_rl(ctx: StageContext) -> dict[str, Any]:
    """Stage 2: reasoning RL with accuracy + format + language consistency (paper: summed)."""
    import r1kit.rewards.language  # noqa: F401  registers the "language" reward

    cfg = ctx.cfg
    return rl_stage(ctx, ctx.model("cold_sft"), RLTask(reasoning_task(cfg), cfg.pipeline.lang), _rl_weights(cfg, True))


@register_stage("reason_rl_nolang", parents=("cold_sft",), keys=("grpo", "eval", "pipeline.lang", "pipeline.general_test", "pipeline.general_digits"))
def stage_reason_rl_nolang(ctx: StageContext) -> dict[str, Any]:
    """Ablation of stage 2: the same RL without the language reward (same seed: a paired comparison)."""
    cfg = ctx.cfg
    return rl_stage(ctx, ctx.model("cold_sft"), RLTask(reasoning_task(cfg), cfg.pipeline.lang), _rl_weights(cfg, False))


@register_stage("sample", parents=("reason_rl",), keys=("sample", "pipeline.lang", "pipeline.general_digits"), explicit=lambda c: {"reason_rl": c.sample.model})
def stage_sample(ctx: StageContext) -> dict[str, Any]:
    """Stage 3a: rejection sampling from the reasoning-RL model, plus non-reasoning examples."""
    from r1kit.recipes.sampling import general_task

    cfg = ctx.cfg
    rng = random.Random(ctx.seed)
    problems = reasoning_task(cfg).train_problems(cfg.sample.num_prompts, rng)
    general = general_task(cfg).train_problems(cfg.sample.num_prompts, rng) if cfg.sample.general_frac > 0 else []
    return sample_data(ctx, ctx.model("reason_rl"), problems, general, "Rejection sampling from the reasoning-RL model")


def sample_data(ctx: StageContext, model_dir: Path, problems: list[Problem], general: list[Problem], title: str) -> dict[str, Any]:
    """Rejection-sample `problems` from `model_dir` into ctx.dir/{data.jsonl, stats.json, stats.md}."""
    from r1kit.recipes.sampling import sample_to_files

    stats = sample_to_files(ctx.dir, model_dir, problems, general, ctx.cfg, seed=ctx.seed, title=title)
    ctx.record_input(ctx.dir / "data.jsonl")
    return {"data": ctx.rel(ctx.dir / "data.jsonl"), "source_model": ctx.rel(model_dir), "stats": stats}


@register_stage("sft", parents=("base", "sample"), keys=("sft", "eval", "pipeline.lang", "pipeline.general_test", "pipeline.general_digits", *SFT_GATE_KEYS),
                explicit=lambda c: {"base": c.sft.init, "sample": c.sft.data})
def stage_sft(ctx: StageContext) -> dict[str, Any]:
    """Stage 3b: SFT of the *base* model on the rejection-sampled data (paper: retrain from the base)."""
    return sft_stage(ctx, ctx.model("base"), ctx.data("sample"), gated=True)


from r1kit.recipes.r1_gate import sft_stage  # noqa: E402  (the SFT stages and their readiness gate)
from r1kit.recipes import r1_all as _r1_all  # noqa: E402,F401  registers stage 4: the reward model and RL for all scenarios
from r1kit.recipes import distill as _distill  # noqa: E402,F401  registers the distillation stages
