"""Seconds per GRPO step: TRL's GRPOTrainer vs r1kit's GRPOTrainer, side by side in one process.

Setting (the TRL figure in ../shared/NOTES.md): a ~3.4M-parameter Llama-type model, 4 prompts x 8
completions per optimizer step, <= 64 new tokens, beta = 0 (no reference model), float32, temperature 1.0,
one optimizer update per batch, on this CPU. Both trainers start from the same saved weights, see the
same prompts in the same order (r1kit's arithmetic task, R1-Zero template) and are scored by the same
rewards (r1kit's accuracy + 0.1 x format).

Timing: W warm-up steps each, then N timed steps each, interleaved in rounds of R steps (R TRL steps,
then R r1kit steps, repeat) so that drifting machine load hits both. TRL drives its own loop
(`trainer.train()`); a callback stamps each optimizer step's end and runs r1kit's round in between, so
a TRL step is the wall time from the end of the previous step (or from the end of the r1kit round) to
the end of this one: data loading, generation, scoring, forward/backward, optimizer and Trainer overhead.
An r1kit step is the wall time of `GRPOTrainer.step()`.

    pip install "trl==1.16.*"      # optional, benchmark-only; not an r1kit dependency
    python benchmarks/bench_vs_trl.py [--steps 8] [--warmup 2] [--round 2] [--threads 1]
        [--variants padded,packed,packed_bf16] [--beta 0.04] [--max-new 256] [--tag NAME]
Writes benchmarks/results/vs_trl[_NAME].json and .md. `--variants` lists the r1kit trainers that run in every
round, side by side with TRL: `padded` (the default update), `packed` (grpo.packed_update: no padding, each
prompt once per group, LM head at completion tokens only), `*_bf16` (model.mixed_precision=bf16: bf16
autocast with fp32 master weights; TRL stays fp32), `packed_bf16s` (packed_bf16 whose engine samples in bf16
too: engine.dtype=bf16, bf16 copies of the fp32 weights; the old logprobs are recomputed, free with one update
per batch since they are the update forward's own, and grpo.tis_cap=2.0 corrects the sampler's).
`--beta` > 0 gives every trainer a frozen reference copy of the initial weights.
`packed_skip` adds grpo.skip_zero_advantage (rows with advantage exactly 0 skip the update: exact, but with
this random-init model every reward is 0, so it skips the whole update: not a like-for-like comparison).
The r1kit phase split (generate, score, logprobs, update) and the update phase's model FLOP utilisation
are in the output. MFU = the FLOPs the update needs (6 x parameters x (each distinct prompt's tokens once per
group + every completion token): the shared-prefix, unpadded work) over the update's seconds and the fp32
matmul peak measured before and after the run (the best 2048 x 2048 float32 matmul on its threads); the
bf16 peak is measured too when a bf16 variant runs (on a CPU without native bf16, e.g. AVX2 only, bf16
matmuls are emulated and much slower than fp32: the run warns).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import trl  # noqa: F401
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer
except ImportError as e:  # trl is an optional, benchmark-only tool
    print(f"bench_vs_trl: TRL is not installed ({e}).\n"
          "It is not an r1kit dependency; install it for this benchmark only:  pip install \"trl==1.16.*\"",
          file=sys.stderr)
    sys.exit(2)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from r1kit.config import ModelConfig, RunConfig, TaskConfig, load_config  # noqa: E402
from r1kit.corpus import build_corpus  # noqa: E402
from r1kit.model import build_tiny_model, load_model, save_model, train_tokenizer  # noqa: E402
from r1kit.policy import Policy  # noqa: E402
from r1kit.rewards import BATCH_REWARD_FUNCS  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.templates import render_prompt  # noqa: E402
from r1kit.trainers.grpo import GRPOTrainer  # noqa: E402
from r1kit.types import Problem  # noqa: E402

PROMPTS, GROUP, LR, SEED = 4, 8, 1e-4, 0
PHASES = ("generate", "score", "logprobs", "update")
# r1kit trainer variants -> their names in the results
VARIANTS = {"padded": "r1kit", "packed": "r1kit_packed", "padded_bf16": "r1kit_bf16", "packed_bf16": "r1kit_packed_bf16",
            "packed_bf16s": "r1kit_packed_bf16s", "packed_skip": "r1kit_packed_skip"}
REWARD_WEIGHTS = {"accuracy": 1.0, "format": 0.1}  # r1kit's defaults, given to both trainers
RESULTS = ROOT / "benchmarks" / "results"


class FixedOrderTask:
    """r1kit Task that hands out a fixed problem list in order: the same prompts TRL reads from its
    (unshuffled) dataset, so both trainers generate for identical prompts step by step."""

    name = "arithmetic-fixed"

    def __init__(self, problems: list[Problem]):
        self.problems, self.pos, self.served = problems, 0, []

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        out = [self.problems[(self.pos + i) % len(self.problems)] for i in range(n)]
        self.pos += n
        self.served.append([p.id for p in out])
        return out

    def test_problems(self) -> list[Problem]:
        return []


def build_shared_model(folder: Path, task) -> int:
    """The tiny tokenizer + ~3.4M-parameter Llama model, saved once; returns the parameter count."""
    torch.manual_seed(SEED)
    docs = build_corpus(task, 2000, 0.6, 0.1, "r1_zero", random.Random(SEED))
    tok = train_tokenizer([d.prompt + d.completion for d in docs], 300)
    mcfg = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=768,
                       max_position_embeddings=512)  # RoPE: room for --max-new 256, same weights
    model = build_tiny_model(mcfg, tok)
    save_model(model, tok, folder)
    return sum(p.numel() for p in model.parameters())


def trl_rewards(by_id: dict[str, Problem], seen: dict[str, list]):
    """r1kit's accuracy and format rewards in TRL's signature (prompts, completions, completion_ids,
    **dataset columns); also counts completion tokens and records which prompts each step saw."""

    def accuracy(prompts, completions, completion_ids, pid, **_):
        seen["tokens"].append(sum(len(c) for c in completion_ids))
        seen["pids"].append(list(dict.fromkeys(pid)))  # the step's distinct prompts, in order
        return BATCH_REWARD_FUNCS["accuracy"](completions, [by_id[i] for i in pid])

    def format(prompts, completions, completion_ids, pid, **_):  # noqa: A001  (the reward's name in TRL logs)
        return BATCH_REWARD_FUNCS["format"](completions, [by_id[i] for i in pid])

    return [accuracy, format]


class Interleave(TrainerCallback):
    """Stamps each TRL optimizer step and runs an r1kit round after every `round` TRL steps."""

    def __init__(self, round_size: int, run_r1kit_round, trl_times: list[float], threads_seen: set[int]):
        self.round, self.run_r1kit_round, self.times, self.threads_seen = round_size, run_r1kit_round, trl_times, threads_seen
        self.t_resume = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_resume = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.t_resume)
        self.threads_seen.add(torch.get_num_threads())
        if state.global_step % self.round == 0:
            self.run_r1kit_round(self.round)
        self.t_resume = time.perf_counter()


def summarize(times: list[float], tokens: list[int]) -> dict:
    med, mean = statistics.median(times), statistics.fmean(times)
    return {"median_s_per_step": med, "mean_s_per_step": mean, "min_s_per_step": min(times),
            "max_s_per_step": max(times), "completion_tokens_per_step_mean": statistics.fmean(tokens),
            "completion_tokens_per_s": sum(tokens) / sum(times), "s_per_step": times, "completion_tokens": tokens}


class R1kitRun:
    """One r1kit GRPOTrainer on its own copy of the saved weights, with its step times and phase split."""

    def __init__(self, tmp: Path, problems: list[Problem], ns, variant: str, total: int):
        packed, bf16, skip = variant.startswith("packed"), "_bf16" in variant, variant.endswith("_skip")
        sampler = ["engine.dtype=bf16", "grpo.recompute_old_logprobs=true", "grpo.tis_cap=2.0"] \
            if variant.endswith("_bf16s") else []  # a bf16 sampler too
        cfg = load_config(RunConfig, None, [
            f"grpo.prompts_per_step={PROMPTS}", f"grpo.group_size={GROUP}", f"grpo.max_new_tokens={ns.max_new}",
            f"grpo.beta={ns.beta}", f"grpo.packed_update={str(packed).lower()}", "grpo.temperature=1.0",
            "grpo.top_p=1.0", f"grpo.lr={LR}", "grpo.updates_per_batch=1", f"grpo.skip_zero_advantage={str(skip).lower()}",
            "grpo.micro_batch_size=32", "grpo.grad_clip=1.0", "grpo.weight_decay=0.0", "model.dtype=float32",
            f"grpo.steps={total}", "log.progress=false", "log.tensorboard=false", "log.save_every=0",
            "log.sample_every=0", "eval.every=0", f"output_dir={tmp / 'r1kit'}", f"name=vs_trl_{variant}",
            f"seed={SEED}", *sampler])
        cfg.grpo.reward_weights = dict(REWARD_WEIGHTS)
        model, tok = load_model(tmp / "init")
        ref = load_model(tmp / "init")[0].eval() if ns.beta > 0 else None
        self.task = FixedOrderTask(problems)
        policy = Policy(model, tok, device="cpu", **({"mixed_precision": "bf16"} if bf16 else {}))
        self.trainer = GRPOTrainer(cfg, policy, self.task, cfg.run_dir, ref_model=ref)
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.phases: list[dict[str, float]] = []

    def steps(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            record, batch = self.trainer.step()
            self.times.append(time.perf_counter() - t)
            self.tokens.append(int(batch.rollout.lengths.sum()))
            ro, G = batch.rollout, batch.rollout.group_size
            # the tokens the update needs: each group's prompt once, every completion token of the rows it trains
            trains = torch.ones(ro.num_rows, dtype=torch.bool)
            if self.trainer.cfg.grpo.skip_zero_advantage:
                trains = (batch.advantages != 0) & (batch.loss_mask.sum(-1) > 0)  # as GRPOTrainer._update_rows
            groups = trains.view(-1, G).any(1)  # [P]
            prompt_tokens = float(ro.prompt_mask[::G][groups].sum())
            self.phases.append({**{p: record.get(f"time/{p}", 0.0) for p in PHASES},
                                "model_tokens": prompt_tokens + float(ro.completion_mask[trains].sum())})

    def summary(self, warmup: int, params: int, peak_gflops: float) -> dict:
        out = summarize(self.times[warmup:], self.tokens[warmup:])
        ph = self.phases[warmup:]
        out["phases_median_s"] = {p: statistics.median(x[p] for x in ph) for p in PHASES}
        mfu = [6 * params * x["model_tokens"] / x["update"] / (peak_gflops * 1e9) for x in ph if x["model_tokens"] > 0]
        out["update_mfu_median"] = statistics.median(mfu) if mfu else None
        return out


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best GFLOP/s of n x n matmuls in `dtype` on the current torch threads over about `seconds`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer first")
    ap.add_argument("--round", type=int, default=2, help="steps of one trainer before switching to the other")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="padded", help=f"r1kit trainers, comma-separated, of {VARIANTS}")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient for both (a reference model when > 0)")
    ap.add_argument("--max-new", type=int, default=64, help="max new tokens per completion, both")
    ap.add_argument("--tag", default="", help="suffix of the result files (vs_trl_TAG.json)")
    ns = ap.parse_args()
    variants = ns.variants.split(",")
    if set(variants) - set(VARIANTS) or not variants:
        ap.error(f"--variants: comma-separated names of {VARIANTS}, got {ns.variants!r}")
    if ns.steps % ns.round or ns.warmup % ns.round:
        ap.error("--steps and --warmup must be multiples of --round")
    torch.set_num_threads(ns.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    load_before = os.getloadavg()
    peaks = {"float32": matmul_peak_gflops(torch.float32)}
    if any("_bf16" in v for v in variants):
        peaks["bfloat16"] = matmul_peak_gflops(torch.bfloat16, seconds=2.0)
        if peaks["bfloat16"] < peaks["float32"]:
            print(f"bench_vs_trl: warning: bf16 matmuls run at {peaks['bfloat16']:.3g} GFLOP/s here against "
                  f"{peaks['float32']:.0f} in fp32 (CPU capability {torch.backends.cpu.get_cpu_capability()}: no native "
                  "bf16); the bf16 variants will be slower than fp32", file=sys.stderr)
    t_start = time.perf_counter()

    task_cfg = TaskConfig()
    task = make_task(task_cfg.name, **task_cfg.options)
    total = ns.warmup + ns.steps
    problems = task.train_problems(PROMPTS * total, random.Random(SEED))
    problems = [Problem(**{**p.__dict__, "id": f"{i:04d}-{p.id}"}) for i, p in enumerate(problems)]  # unique ids
    by_id = {p.id: p for p in problems}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build_shared_model(tmp / "init", task)
        trl_model, trl_tok = load_model(tmp / "init")  # two independent copies of the same weights

        # ---- r1kit (padded and/or packed update, each its own copy of the weights) -----------------------
        runs = {VARIANTS[v]: R1kitRun(tmp, problems, ns, v, total) for v in variants}

        def run_r1kit_round(n: int) -> None:
            for run in runs.values():
                run.steps(n)

        # ---- TRL --------------------------------------------------------------------------------
        ds = Dataset.from_dict({"prompt": [render_prompt(p.question, task_cfg.template) for p in problems],
                                "pid": [p.id for p in problems]})
        trl_args = TRLGRPOConfig(
            output_dir=str(tmp / "trl"), max_steps=total, seed=SEED,
            per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1, steps_per_generation=1,
            num_generations=GROUP, num_iterations=1, max_completion_length=ns.max_new, temperature=1.0, top_p=1.0,
            top_k=0, beta=ns.beta, loss_type="grpo", scale_rewards="group", epsilon=0.2,
            reward_weights=[REWARD_WEIGHTS["accuracy"], REWARD_WEIGHTS["format"]],
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
            use_vllm=False, bf16=False, fp16=False, use_cpu=True, shuffle_dataset=False,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        )
        trl_seen: dict[str, list] = {"tokens": [], "pids": []}
        trl_times: list[float] = []
        threads_seen: set[int] = set()
        trainer = TRLGRPOTrainer(model=trl_model, reward_funcs=trl_rewards(by_id, trl_seen), args=trl_args,
                                 train_dataset=ds, processing_class=trl_tok,
                                 callbacks=[Interleave(ns.round, run_r1kit_round, trl_times, threads_seen)])
        torch.set_num_threads(ns.threads)  # in case anything above changed it
        setup_s = time.perf_counter() - t_start
        trainer.train()
        trl_steps_done = trainer.state.global_step

    wall_s = time.perf_counter() - t_start
    load_after = os.getloadavg()
    peaks["float32"] = max(peaks["float32"], matmul_peak_gflops(torch.float32))  # best of before and after
    w = ns.warmup
    counts = {name: len(run.times) for name, run in runs.items()}
    if not (len(trl_times) == total == trl_steps_done and set(counts.values()) == {total}):
        raise SystemExit(f"step counts differ: TRL {len(trl_times)} timed / {trl_steps_done} done, r1kit {counts}")
    same_prompts = all(trl_seen["pids"] == run.task.served for run in runs.values())
    trl_res = summarize(trl_times[w:], trl_seen["tokens"][w:])
    results = {name: run.summary(w, params, peaks["float32"]) for name, run in runs.items()}
    ratios = {name: {"median": trl_res["median_s_per_step"] / r["median_s_per_step"],
                     "mean": trl_res["mean_s_per_step"] / r["mean_s_per_step"]} for name, r in results.items()}

    command = " ".join(shlex.quote(a) for a in ["python", *[str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                                                             if i == 0 else a for i, a in enumerate(sys.argv)]])
    out = {
        "command": command,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": md.version("transformers"), "trl": md.version("trl"),
                     "accelerate": md.version("accelerate"), "datasets": md.version("datasets")},
        "threads": ns.threads, "r1kit_variants": variants, "torch_threads_seen_during_run": sorted(threads_seen),
        "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "matmul_peak_gflops": peaks,
        "loadavg_before": list(load_before), "loadavg_after": list(load_after),
        "setting": {"params": params, "arch": "llama", "hidden": 256, "layers": 4, "heads": 4, "intermediate": 768,
                    "dtype": "float32", "prompts_per_step": PROMPTS, "group_size": GROUP,
                    "completions_per_step": PROMPTS * GROUP, "max_new_tokens": ns.max_new, "beta": ns.beta,
                    "temperature": 1.0, "top_p": 1.0, "lr": LR, "updates_per_batch": 1,
                    "reward_weights": REWARD_WEIGHTS, "task": f"arithmetic {task_cfg.options}",
                    "template": task_cfg.template},
        "schedule": {"warmup_steps_each": ns.warmup, "timed_steps_each": ns.steps, "round": ns.round,
                     "order": "TRL round, then a round of each r1kit trainer, repeated"},
        "same_prompts_in_same_order": same_prompts,
        "trl": trl_res, **results,
        "ratio_trl_over": ratios,
        "setup_s": setup_s, "wall_s": wall_s,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "vs_trl" + (f"_{ns.tag}" if ns.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render_md(out))

    print(f"{'trainer':<13} {'median s':>9} {'mean s':>8} {'tok/step':>9} {'tok/s':>7}")
    for name in ("trl", *results):
        r = out[name]
        print(f"{name:<13} {r['median_s_per_step']:9.3f} {r['mean_s_per_step']:8.3f} "
              f"{r['completion_tokens_per_step_mean']:9.1f} {r['completion_tokens_per_s']:7.0f}")
    for name, r in results.items():
        ph = r["phases_median_s"]
        print(f"TRL / {name}: {ratios[name]['median']:.2f}x (median), {ratios[name]['mean']:.2f}x (mean); phases "
              f"(median s): " + ", ".join(f"{p} {ph[p]:.3f}" for p in PHASES)
              + f"; update MFU {_pct(r['update_mfu_median'])}")
    print("matmul peak (GFLOP/s): " + ", ".join(f"{k} {v:.3g}" for k, v in peaks.items())
          + f"; CPU capability {out['cpu_capability']}")
    print(f"same prompts: {same_prompts}; threads {ns.threads}; load {load_before[0]:.2f} -> {load_after[0]:.2f}; "
          f"wall {wall_s:.0f} s")
    print(f"wrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.md')}")


def _pct(x: float | None) -> str:
    return "n/a (no row trained)" if x is None else f"{x:.1%}"


def render_md(o: dict) -> str:
    t, v, s = o["trl"], o["versions"], o["setting"]
    names = [n for n in VARIANTS.values() if n in o]
    r = o[names[0]]
    label = {n: "r1kit GRPOTrainer" + ("" if v == "padded" else f", {v}") for v, n in VARIANTS.items()}
    rows = "\n".join(
        f"| {name} | {x['median_s_per_step']:.3f} | {x['mean_s_per_step']:.3f} | {x['min_s_per_step']:.3f}–"
        f"{x['max_s_per_step']:.3f} | {x['completion_tokens_per_step_mean']:.0f} | {x['completion_tokens_per_s']:.0f} |"
        for name, x in (("TRL GRPOTrainer", t), *((label[n], o[n]) for n in names)))
    summary = "\n".join(
        f"- **TRL / {label[n]}: {o['ratio_trl_over'][n]['median']:.2f}x (median), {o['ratio_trl_over'][n]['mean']:.2f}x "
        f"(mean).** Phases (median s): {', '.join(f'{p} {x:.3f}' for p, x in o[n]['phases_median_s'].items())}; "
        f"update MFU {_pct(o[n]['update_mfu_median'])}." for n in names)
    peak = o["matmul_peak_gflops"]["float32"]
    bf16_peak = o["matmul_peak_gflops"].get("bfloat16")
    skip_note = ("" if "r1kit_packed_skip" not in o else " (except r1kit's packed_skip, grpo.skip_zero_advantage: "
                 "its gradient is the same, exactly 0, but it skips every row's forward/backward and only steps AdamW; "
                 "not a like-for-like comparison here)")
    bf16_note = "" if bf16_peak is None else f" The bf16 matmul peak measured here: {bf16_peak:.3g} GFLOP/s."
    return f"""# TRL vs r1kit: seconds per GRPO step, same model, same settings, one process

`{o['command']}`: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, accelerate
{v['accelerate']}; {o['threads']} torch thread(s) on a {o['cpu_count']}-core CPU ({o['cpu_capability']}) shared with other jobs
(load average {o['loadavg_before'][0]:.2f} before, {o['loadavg_after'][0]:.2f} after).

| trainer | median s/step | mean s/step | range | completion tokens/step | completion tokens/s |
|---|---|---|---|---|---|
{rows}

{summary}

Update MFU: 6 x parameters x (each group's prompt tokens once + every completion token: the shared-prefix,
unpadded work the update needs), over the update phase's seconds and the fp32 matmul peak measured at the start
and end of this run, {peak:.0f} GFLOP/s (CPU capability {o['cpu_capability']}; bf16 variants too).{bf16_note}
{o['schedule']['timed_steps_each']} timed steps each after {o['schedule']['warmup_steps_each']} warm-up steps each,
interleaved in rounds of {o['schedule']['round']} (TRL, then each r1kit trainer), so load drift hits all. Tokens/s is total
completion tokens over total step time.

## Setting (both trainers)
- {s['params']:,}-parameter Llama-type model (hidden 256, 4 layers, 4 heads, MLP 768, tied embeddings), random
  init, built once, saved, and loaded twice: both trainers start from identical weights; float32.
- {s['prompts_per_step']} prompts x {s['group_size']} completions = one optimizer step, at most {s['max_new_tokens']}
  new tokens, temperature 1.0, top-p 1.0 (TRL top-k 0), beta = {s['beta']} (a reference model when > 0), one update per batch
  (TRL num_iterations=1, r1kit updates_per_batch=1), lr {s['lr']:g} constant, AdamW betas (0.9, 0.99), eps 1e-8,
  no weight decay, gradient clipping at 1.0, all 32 rows in one forward/backward.
- Same prompts in the same order: r1kit's arithmetic task ({s['task']}), R1-Zero template; TRL reads them from an
  unshuffled dataset, r1kit from a task that serves the same list (checked: {o['same_prompts_in_same_order']}).
- Same rewards: r1kit's accuracy (weight 1.0) and format (0.1), wrapped as TRL reward functions.
- TRL: `per_device_train_batch_size=32, num_generations=8, gradient_accumulation_steps=1, steps_per_generation=1`,
  so one TRL step (`global_step`) = one generation batch of 32 completions = one optimizer step. `loss_type="grpo"`
  (token mean per sequence, then mean over sequences: r1kit's `seq-mean-token-mean`), `scale_rewards="group"`,
  epsilon 0.2; no vLLM, bf16/fp16 off, `use_cpu=True`, logging/saving/eval off, `report_to="none"`.

## What is not identical
- What a "step" covers: TRL's is the wall time of its own `Trainer.train()` loop between two optimizer steps
  (dataloader, generation, reward, forward/backward, optimizer, HF Trainer/accelerate bookkeeping and TRL's
  metric gathering); r1kit's is `GRPOTrainer.step()` (sampling, scoring, update, batch metrics), without
  `train()`'s per-step JSONL logging (switched off for TRL as far as its options allow).
- Completions differ: each trainer samples with its own random stream, so completion lengths differ (here
  {t['completion_tokens_per_step_mean']:.0f} vs {r['completion_tokens_per_step_mean']:.0f} tokens/step of at most
  {s['completions_per_step'] * s['max_new_tokens']}); tokens/s normalizes for that. With a random-init model
  rewards are all 0 in both (zero advantages), but both still run the full forward/backward and optimizer step{skip_note}.
- Generation is each library's own, by design: TRL calls `model.generate()` on 32 left-padded rows (each prompt
  repeated 8 times through prefill, finished rows decoded until the longest ends); r1kit uses its own engine.
- TRL's old-policy logprobs: with num_iterations=1 and steps_per_generation=gradient_accumulation_steps, TRL skips
  the extra forward and uses the detached current logprobs; r1kit uses the sampler's logprobs. Neither does an
  extra forward pass here. Both compute token entropies in the training forward.
- {o['threads']} thread(s) here versus 2 in the 0.80 s/step TRL figure of ../shared/NOTES.md: not comparable to it.
"""


if __name__ == "__main__":
    main()
