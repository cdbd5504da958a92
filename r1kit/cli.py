"""`r1kit <verb>`: thin command-line front end. With no verb, runs R1-Zero on the embedded default.

    r1kit                                   # = r1kit zero (embedded configs/zero-tiny.yaml)
    r1kit zero [CONFIG.yaml] [key=value ...] [--resume]
    r1kit pretrain [CONFIG.yaml] [key=value ...]
    r1kit generate --model PATH --prompt TEXT [--n 4 --temperature 0.6 ...]
    r1kit eval --model PATH --benchmark NAME [...]
    r1kit serve --model PATH [--port 8000 --api-key KEY ...]   # OpenAI/DeepSeek-compatible server + chat page
    r1kit export --model ADAPTER_OR_CHECKPOINT --out DIR --merge   # a plain HF folder every verb loads
    r1kit pipeline [r1-tiny|CONFIG.yaml] [key=value ...]   # the R1 recipe + distillation, resumable
    r1kit sft [CONFIG] [sft.data=F sft.init=M] [--stage cold_sft]
    r1kit sample [CONFIG] [sample.model=M]
    r1kit rm [CONFIG] [rm.data=F rm.init=M]
    r1kit distill [CONFIG] [distill.teacher=M] [--rl-baseline]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

DEFAULT_CONFIG = "zero-tiny"


def config_path(name_or_path: str | None) -> Path:
    """A YAML path, or the name of an embedded config (r1kit/configs/<name>.yaml)."""
    from r1kit.types import R1KitError

    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    embedded = resources.files("r1kit") / "configs" / f"{name_or_path}.yaml"
    if embedded.is_file():
        return Path(str(embedded))
    names = sorted(x.name[:-5] for x in (resources.files("r1kit") / "configs").iterdir() if x.name.endswith(".yaml"))
    raise R1KitError(f"config {name_or_path!r} is neither a YAML file nor an embedded config {names}")


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """First positional that is not key=value is the config; the rest are overrides."""
    cfg, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif cfg is None:
            cfg = a
        else:
            from r1kit.types import R1KitError

            raise R1KitError(f"unexpected argument {a!r}: give one config file, then key=value overrides")
    return cfg, overrides


def _run_config(args: list[str]):
    from r1kit.config import RunConfig, load_config

    cfg_name, overrides = _split_config_args(args)
    return load_config(RunConfig, config_path(cfg_name), overrides)


def cmd_zero(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="r1kit zero", description="R1-Zero: pretrain the tiny base (if needed), GRPO, evaluate.")
    ap.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    ap.add_argument("args", nargs="*", help="[CONFIG.yaml or embedded name] [key=value ...]")
    ns = ap.parse_args(argv)
    from r1kit.recipes.zero import run_zero

    cfg = _run_config(ns.args)
    summary = run_zero(cfg, resume=ns.resume)
    b, f = summary["base"], summary["final"]
    print(f"\nR1-Zero run {cfg.name!r} done in {summary['seconds']['total']:.0f}s -> {cfg.run_dir}")
    print(f"  held-out pass@1   base {b.get('pass1', 0):.3f} -> final {f.get('pass1', 0):.3f}")
    print(f"  cons@{cfg.eval.k}           base {b.get('cons', 0):.3f} -> final {f.get('cons', 0):.3f}")
    print(f"  mean length       base {b.get('mean_length', 0):.1f} -> final {f.get('mean_length', 0):.1f} tokens")
    print(f"  curves: {cfg.run_dir / 'curves.png'}")
    return 0


def cmd_pretrain(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="r1kit pretrain", description="Stage 0: pretrain the tiny base model.")
    ap.add_argument("args", nargs="*", help="[CONFIG.yaml or embedded name] [key=value ...]")
    ns = ap.parse_args(argv)
    from r1kit.recipes.zero import base_dir, ensure_base_model

    cfg = _run_config(ns.args)
    if (base_dir(cfg) / "pretrain.json").exists():
        print(f"base model already complete at {base_dir(cfg)}")
    path = ensure_base_model(cfg, cfg.log.progress)
    info = json.loads((path / "pretrain.json").read_text())
    print(f"base model at {path}: {info['params']:,} parameters, {info['seconds']:.0f}s, final loss {info['final_loss']:.3f}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="r1kit generate", description="Sample completions from a model.")
    ap.add_argument("--model", required=True, help="HF causal-LM folder")
    ap.add_argument("--prompt", action="append", required=True, help="question (repeatable)")
    ap.add_argument("--template", default="r1_zero",
                    help="r1_zero | plain | chat (the model's chat template) | none | a format string with {question}")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object per sample")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--backend", default="local", choices=["local", "vllm"], help="engine (vllm: the `vllm` extra)")
    ns = ap.parse_args(argv)
    from r1kit.policy import Policy
    from r1kit.templates import parse_completion, render_prompt
    from r1kit.trainers.grpo import decode_completions

    policy = Policy.load(ns.model, device=ns.device)  # a bad folder is an error naming it
    tok, eng = policy.tokenizer, policy.make_engine(ns.backend)
    texts = [q if ns.template == "none" else render_prompt(q, ns.template, tok) for q in ns.prompt]
    ro = eng.generate([tok(t).input_ids for t in texts], group_size=ns.n, max_new_tokens=ns.max_new_tokens,
                      temperature=ns.temperature, top_p=ns.top_p, generator=policy.generator(ns.seed))
    for i, c in enumerate(decode_completions(tok, ro)):
        q = ns.prompt[i // ns.n]
        if ns.json:
            p = parse_completion(c)
            print(json.dumps({"prompt": q, "sample": i % ns.n, "completion": c, "reasoning": p.think,
                              "answer": p.answer, "tokens": int(ro.lengths[i]), "truncated": bool(ro.truncated[i])}))
        else:
            print(f"[{q} #{i % ns.n}]{c}")
    return 0


def cmd_export(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="r1kit export", description="Write a plain HF folder from a model, a checkpoint "
                                 "or a LoRA adapter (merged into its base with --merge); every verb loads the result.")
    ap.add_argument("--model", required=True, help="an HF folder, a LoRA adapter folder, or a checkpoint step-N/")
    ap.add_argument("--out", required=True, help="the folder to write (written atomically)")
    ap.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base weights")
    ns = ap.parse_args(argv)
    from r1kit.io import atomic_dir
    from r1kit.model import load_model, save_model
    from r1kit.types import R1KitError

    src = Path(ns.model)
    src = src / "model" if (src / "trainer_state.pt").exists() else src  # a checkpoint folder: its model/
    if (src / "adapter_config.json").exists() and not ns.merge:
        raise R1KitError(f"{str(src)!r} is a LoRA adapter: pass --merge to write a full model folder")
    model, tok = load_model(src)  # an adapter folder loads merged into its base
    with atomic_dir(Path(ns.out)) as tmp:
        save_model(model, tok, tmp)
    print(f"wrote {ns.out} ({sum(p.numel() for p in model.parameters()):,} parameters, {model.config.model_type})")
    return 0


def cmd_serve(argv: list[str]) -> int:
    try:
        from r1kit.serving.server import main as serve_main
    except ImportError as e:
        from r1kit.types import R1KitError

        raise R1KitError(f"r1kit serve needs the serve extra ({e.name} is missing): pip install 'r1kit[serve]'") from e
    return serve_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from r1kit.evaluation.cli import main as eval_main

    return eval_main(argv)


# ---- the R1 recipe (r1kit.recipes.r1): each verb runs pipeline stages, finished ones are skipped ----
PIPELINE_CONFIG = "r1-tiny"


def _stage_args(prog: str, description: str, argv: list[str], extra=None):
    ap = argparse.ArgumentParser(prog=prog, description=description)
    if extra:
        extra(ap)
    ap.add_argument("args", nargs="*", help=f"[CONFIG.yaml or embedded name, default {PIPELINE_CONFIG}] [key=value ...]")
    ns = ap.parse_args(argv)
    cfg_name, overrides = _split_config_args(ns.args)
    from r1kit.config import RunConfig, load_config

    return ns, load_config(RunConfig, config_path(cfg_name or PIPELINE_CONFIG), overrides)


def _print_stage(rec: dict) -> None:
    ev = rec.get("eval")
    line = f"  {rec['stage']:<17} {rec['seconds']:6.0f}s"
    if ev:
        line += (f"  pass@1 {ev['pass1']:.3f}  format {ev['format_rate']:.3f}  mixing {ev['mixing_rate']:.3f}"
                 f"  length {ev['mean_length']:.1f}")
    if "stats" in rec:
        st = rec["stats"]
        line += f"  kept {st['kept']}/{st['samples']} samples, {st['records']} SFT records"
    print(line)


def cmd_pipeline(argv: list[str]) -> int:
    _, cfg = _stage_args("r1kit pipeline", "The multi-stage R1 recipe and distillation; rerun to resume.", argv)
    from r1kit.recipes.r1 import run_pipeline

    records = run_pipeline(cfg, log=print if cfg.log.progress else (lambda s: None))
    print(f"\nR1 pipeline {cfg.name!r} -> {cfg.run_dir}")
    for rec in records.values():
        _print_stage(rec)
    print(f"  table: {cfg.run_dir / 'pipeline.md'}")
    return 0


def _one_stage(stage: str, rec_printer=_print_stage):
    from r1kit.recipes.r1 import run_stage

    def run(cfg) -> int:
        rec = run_stage(cfg, stage)
        rec_printer(rec)
        print(f"  outputs: {cfg.run_dir / stage}")
        return 0

    return run


def cmd_sft(argv: list[str]) -> int:
    ns, cfg = _stage_args("r1kit sft", "SFT on chat JSONL (loss on completions only).", argv,
                          lambda ap: ap.add_argument("--stage", choices=["sft", "cold_sft"], default="sft",
                                                     help="which pipeline stage (cold_sft writes its own data)"))
    return _one_stage(ns.stage)(cfg)


def cmd_sample(argv: list[str]) -> int:
    _, cfg = _stage_args("r1kit sample", "Rejection sampling from a checkpoint into SFT data.", argv)
    return _one_stage("sample")(cfg)


def cmd_rm(argv: list[str]) -> int:
    _, cfg = _stage_args("r1kit rm", "Train a Bradley-Terry reward model on preference pairs.", argv)
    from r1kit.recipes.r1 import run_stage

    rec = run_stage(cfg, "rm")
    v = rec["rm"]
    print(f"  reward model {cfg.run_dir / rec['model']}: validation pairwise accuracy "
          f"{v['val_before']['accuracy']:.3f} -> {v['val_after']['accuracy']:.3f}")
    return 0


def cmd_distill(argv: list[str]) -> int:
    ns, cfg = _stage_args("r1kit distill", "Distil the teacher's filtered traces into a smaller student.", argv,
                          lambda ap: ap.add_argument("--rl-baseline", action="store_true",
                                                     help="also train the student by RL alone (same wall-clock)"))
    from r1kit.recipes.distill import run_distill
    from r1kit.recipes.r1 import run_stage

    records = run_distill(cfg)
    if ns.rl_baseline:
        records["student_rl"] = run_stage(cfg, "student_rl")
    for rec in records.values():
        _print_stage(rec)
    return 0


VERBS = {"zero": cmd_zero, "pretrain": cmd_pretrain, "generate": cmd_generate, "eval": cmd_eval, "export": cmd_export,
         "serve": cmd_serve, "pipeline": cmd_pipeline, "sft": cmd_sft, "sample": cmd_sample, "rm": cmd_rm, "distill": cmd_distill}


def main(argv: list[str] | None = None) -> int:
    from r1kit.types import R1KitError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    verb, rest = (argv[0], argv[1:]) if argv and argv[0] in VERBS else ("zero", argv)
    if argv and verb == "zero" and argv[0] not in VERBS and not ("=" in argv[0] or argv[0].startswith("-") or argv[0].endswith((".yaml", ".yml"))):
        print(f"r1kit: unknown command {argv[0]!r}; commands: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from r1kit import dist

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if dist.init_from_env() and not dist.is_main():  # under torchrun only rank 0 prints results
            sys.stdout = open(os.devnull, "w")
        return dist.run_main(lambda: VERBS[verb](rest))
    except R1KitError as e:
        print(f"r1kit {verb}: error{dist.rank_tag()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nr1kit {verb}: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
