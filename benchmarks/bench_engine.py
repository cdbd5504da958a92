"""Engine vs transformers' `model.generate()`: completion tokens per second on the same model and batch.

A tiny Llama (hidden 128, 4 layers, vocab 512, 1.05M parameters, float32, CPU) samples G = 8
completions for each of 16 prompts of ~60 tokens, up to 64 new tokens, in three settings:

- fixed:  every row generates exactly 64 tokens (our Engine with no EOS; HF with min_new_tokens = 64),
          a like-for-like token count;
- eos:    a set of EOS tokens ends rows early at varying lengths (T = 1, top-p = 1);
- eos_t0.7_p0.9: the same with temperature 0.7 and top-p 0.9.

HF gets `num_return_sequences=G`, `do_sample=True`, the same temperature/top-p and top_k=0. Both run side
by side in one process, alternating, median of `--repeats`. Ablations on the eos run: our Engine on the
HF-forward backend (prefill sharing + compaction only) and with compaction off.

`--baseline DIR` adds an older engine side by side ("baseline": DIR is a copy of an older r1kit/engine
package, loaded under another name), e.g. the engine before the request-level scheduler:
    git archive f5671da r1kit/engine | tar -x -C /tmp/base
    python benchmarks/bench_engine.py --baseline /tmp/base/r1kit/engine

Request-level workloads ("serving", through add_request/step, max_num_seqs = 32, all requests arriving
at once; tokens/s, time to first token, prompt tokens prefilled):
- mixed: 48 requests, a 48-token shared system prompt + an 8-16 token question, n = 1..4, max_tokens
  8..64, T = 1, seeded: continuous batching (requests join as slots free up) vs the same engine fed in
  static waves (a wave starts only when the previous one drained: what the engine could do before) vs
  continuous batching without the prefix cache;
- long_prefix: 32 requests, a 192-token shared system prompt, max_tokens 4: prefix cache vs none.

Run: python benchmarks/bench_engine.py [--repeats 3] [--threads 1] [--baseline DIR]
(prints a table, writes benchmarks/results/engine.json)
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from r1kit.engine import Engine, SamplingParams

BASELINE = None  # the older Engine class, with --baseline

P, G, PROMPT_LEN, MAX_NEW, VOCAB, PAD = 16, 8, 60, 64, 512, 0
EOS = list(range(1, 17))  # 16 of 512 tokens: ~3% per step on a fresh model, so lengths vary widely


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def make_prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT_LEN - 8, PROMPT_LEN + 9, (P,), generator=g)
    return [torch.randint(20, VOCAB, (int(n),), generator=g).tolist() for n in lengths]


def hf_generate(model, prompts, *, fixed: bool, temperature: float, top_p: float, seed: int) -> int:
    """model.generate() on the left-padded batch; returns completion tokens up to and including EOS."""
    Tp = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (Tp - len(p)) + p for p in prompts])
    mask = (torch.arange(Tp)[None] >= torch.tensor([Tp - len(p) for p in prompts])[:, None]).long()
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=G, max_new_tokens=MAX_NEW,
        min_new_tokens=MAX_NEW if fixed else 0, temperature=temperature, top_p=top_p, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD,
    )[:, Tp:]  # [N, <= MAX_NEW]
    is_eos = torch.isin(out, torch.tensor(EOS))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, out.shape[1])
    return int(first.sum())


def ours(engine, prompts, *, temperature: float, top_p: float, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    r = engine.generate(prompts, group_size=G, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p,
                        generator=gen)
    return int(r.completion_mask.sum())


def aten_ops(fn) -> int:
    """How many aten ops `fn()` dispatches: a load-independent measure of per-step overhead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def timed(fn) -> tuple[float, int, float]:
    """-> (wall seconds, tokens, CPU seconds of this process: less swayed by other processes' load)."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return time.perf_counter() - t0, n, time.process_time() - c0


def bench_setting(model, prompts, name, *, fixed, temperature, top_p, repeats, ablations) -> dict:
    eos = [] if fixed else EOS
    variants = {"ours": Engine(model, eos_token_ids=eos, pad_token_id=PAD)}
    if BASELINE is not None:
        variants["baseline"] = BASELINE(model, eos_token_ids=eos, pad_token_id=PAD)
    if ablations:
        variants["ours_hf_backend"] = Engine(model, eos_token_ids=eos, pad_token_id=PAD, fast_path=False)
        variants["ours_no_compaction"] = Engine(model, eos_token_ids=eos, pad_token_id=PAD, compact_fraction=1.0)
    runs = {k: [] for k in [*variants, "hf"]}
    for rep in range(repeats + 1):  # repeat 0 is a warm-up
        order = list(variants.items())
        for key, eng in order if rep % 2 else order[::-1]:  # alternate: load drift hits both alike
            r = timed(lambda: ours(eng, prompts, temperature=temperature, top_p=top_p, seed=rep))
            runs[key].append(r)
        r = timed(lambda: hf_generate(model, prompts, fixed=fixed, temperature=temperature, top_p=top_p, seed=rep))
        runs["hf"].append(r)
    result = {"setting": name, "temperature": temperature, "top_p": top_p, "fixed_length": fixed}
    for key, rs in runs.items():
        rs = rs[1:]
        result[key] = {
            "tokens_per_s": statistics.median(n / s for s, n, _ in rs),
            "seconds": statistics.median(s for s, _, _ in rs),
            "tokens": statistics.median(n for _, n, _ in rs),
            "cpu_seconds": statistics.median(c for _, _, c in rs),
        }
    result["speedup"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    if "baseline" in result:  # paired: the two ran back to back in each repeat (robust to a loaded machine)
        pairs = list(zip(runs["ours"][1:], runs["baseline"][1:]))
        result["ours_vs_baseline"] = {  # speed ratios (> 1: ours faster)
            "median_paired_wall": statistics.median(b[0] / o[0] for o, b in pairs),
            "median_paired_cpu": statistics.median(b[2] / o[2] for o, b in pairs),
            "best_wall": min(b[0] for _, b in pairs) / min(o[0] for o, _ in pairs),
            "paired_wall": [b[0] / o[0] for o, b in pairs],
            "aten_ops_per_call": {k: aten_ops(lambda: ours(variants[k], prompts, temperature=temperature,
                                                               top_p=top_p, seed=0)) for k in ("ours", "baseline")},
        }
    stats = variants["ours"].stats
    result["ours_stats_per_call"] = {k: v / (repeats + 1) for k, v in vars(stats).items()}
    return result


def load_baseline(path: str):
    """An older r1kit/engine package under another name (its `r1kit.engine.` imports rewritten)."""
    src, name = Path(path), "r1kit_baseline_engine"
    dst = Path(tempfile.mkdtemp()) / name
    dst.mkdir()
    for f in src.glob("*.py"):
        (dst / f.name).write_text(f.read_text().replace("r1kit.engine.", f"{name}."))
    sys.path.insert(0, str(dst.parent))
    return importlib.import_module(name).Engine


def serving_requests(seed: int, *, count: int = 48, system_len: int = 48, short: bool = False):
    """`count` requests sharing a `system_len`-token system prompt, each with its own 8-16 token question;
    n = 1..4 and max_tokens 8..64 (short: n = 1, max_tokens 4). -> [(prompt ids, SamplingParams)]."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(20, VOCAB, (system_len,), generator=g).tolist()
    out = []
    for i in range(count):
        question = torch.randint(20, VOCAB, (int(torch.randint(8, 17, (1,), generator=g)),), generator=g).tolist()
        n, max_tokens = (1, 4) if short else (1 + i % 4, 8 + (i * 7) % 57)
        out.append((system + question, SamplingParams(n=n, max_tokens=max_tokens, seed=seed * 1000 + i)))
    return out


def serve(engine, requests, *, waves: bool, per_step: int | None = None) -> dict:
    """Continuous batching: requests are added as they arrive (all at t = 0, or `per_step` before each
    step) and join as slots free up. Waves (all at t = 0): the engine before it, where rows could leave a
    batch but never join one: a wave of requests that fit max_num_seqs starts only when the previous one
    has drained. -> tokens, seconds, time to first token (from t = 0), prefix-cache hit tokens."""
    t0, tokens, queue, first = time.perf_counter(), 0, list(requests), {}
    hits0 = engine.cache_stats().hit_tokens
    while queue or engine.has_unfinished():
        if queue and (not waves or not engine.has_unfinished()):
            room = engine.scheduler.max_num_seqs if waves else per_step or len(queue)
            while queue and (queue[0][1].n <= room if waves else room > 0):
                prompt, params = queue.pop(0)
                engine.add_request(prompt, params)
                room -= params.n if waves else 1
        for o in engine.step():
            tokens += len(o.token_ids)
            first.setdefault(o.request_id, time.perf_counter() - t0)
    ttft = sorted(first.values())
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "ttft_mean": statistics.mean(ttft),
            "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))], "cache_hit_tokens": engine.cache_stats().hit_tokens - hits0,
            "prefill_tokens": engine.stats.prefill_tokens}


def bench_serving(model, repeats: int) -> dict:
    """Request-level workloads through add_request/step (max_num_seqs = 32), variants alternating."""
    def engine(**kw):
        return Engine(model, eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=32, **kw)

    workloads = {  # name: (request shape, arrivals per step, {variant: (engine, waves)})
        "mixed": (dict(), None, {"continuous": (engine(), False), "static_waves": (engine(), True),
                                 "continuous_no_cache": (engine(cache_mb=0), False)}),
        "long_prefix": (dict(count=32, system_len=192, short=True), 2,
                        {"prefix_cache": (engine(), False), "no_cache": (engine(cache_mb=0), False)}),
    }
    out = {}
    for name, (shape, per_step, variants) in workloads.items():
        runs = {k: [] for k in variants}
        for rep in range(repeats + 1):  # repeat 0 is a warm-up
            order = list(variants.items())
            for key, (eng, waves) in order if rep % 2 else order[::-1]:
                eng.load_weights()  # an empty prefix cache at the start of every repeat
                eng.stats.reset()
                runs[key].append(serve(eng, serving_requests(rep, **shape), waves=waves, per_step=per_step))
        result = {"requests": shape.get("count", 48), "system_prompt": shape.get("system_len", 48),
                  "arrivals_per_step": per_step or "all at once"}
        for key, rs in runs.items():
            rs = rs[1:]
            metrics = ("tokens", "seconds", "ttft_mean", "ttft_p90", "cache_hit_tokens", "prefill_tokens")
            result[key] = {m: statistics.median(r[m] for r in rs) for m in metrics}
            result[key]["tokens_per_s"] = statistics.median(r["tokens"] / r["seconds"] for r in rs)
        out[name] = result
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default because on a shared 2-core machine two threads swing 10x")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine.json"))
    ap.add_argument("--baseline", default=None, help="an older r1kit/engine package folder to compare with")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global BASELINE
    BASELINE = load_baseline(args.baseline) if args.baseline else None
    model, prompts = tiny_llama(), make_prompts()
    settings = [
        ("fixed", dict(fixed=True, temperature=1.0, top_p=1.0, ablations=False)),
        ("eos", dict(fixed=False, temperature=1.0, top_p=1.0, ablations=True)),
        ("eos_t0.7_p0.9", dict(fixed=False, temperature=0.7, top_p=0.9, ablations=False)),
    ]
    results = [bench_setting(model, prompts, n, repeats=args.repeats, **kw) for n, kw in settings]
    serving = bench_serving(model, args.repeats)
    meta = {
        "model": "Llama hidden 128, 4 layers, 4 heads / 2 kv heads, ffn 512, vocab 512, tied, float32",
        "params": sum(p.numel() for p in model.parameters()),
        "prompts": P, "group_size": G, "prompt_len": [min(map(len, prompts)), max(map(len, prompts))],
        "max_new_tokens": MAX_NEW, "eos_ids": len(EOS), "repeats": args.repeats, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "metric": "completion tokens / s (median)",
        "baseline": args.baseline,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "serving": serving}, indent=2) + "\n")
    print(f"{meta['model']}, {meta['params'] / 1e6:.2f}M params; {P} prompts x G={G}, <= {MAX_NEW} new tokens")
    print(f"{'setting':<16}{'variant':<20}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'vs HF':>7}")
    for r in results:
        for key in [k for k in r if isinstance(r[k], dict) and "tokens_per_s" in r[k]]:
            v = r[key]
            ratio = v["tokens_per_s"] / r["hf"]["tokens_per_s"]
            print(f"{r['setting']:<16}{key:<20}{v['tokens']:>8.0f}{v['seconds']:>9.3f}"
                  f"{v['tokens_per_s']:>9.0f}{ratio:>6.2f}x")
    print(f"\n{'workload':<13}{'variant':<21}{'tokens':>7}{'seconds':>9}{'tok/s':>7}{'TTFT mean':>11}{'TTFT p90':>10}"
          f"{'prefilled':>10}{'cache hits':>11}")
    for name, result in serving.items():
        for key, v in result.items():
            if isinstance(v, dict):
                print(f"{name:<13}{key:<21}{v['tokens']:>7.0f}{v['seconds']:>9.3f}{v['tokens_per_s']:>7.0f}"
                      f"{v['ttft_mean']:>10.3f}s{v['ttft_p90']:>9.3f}s{v['prefill_tokens']:>10.0f}"
                      f"{v['cache_hit_tokens']:>11.0f}")
    for r in results:
        if "ours_vs_baseline" in r:
            v = r["ours_vs_baseline"]
            print(f"{r['setting']:<16}ours / baseline speed, median of paired repeats: wall "
                  f"{v['median_paired_wall']:.3f}x, CPU time {v['median_paired_cpu']:.3f}x; "
                  f"best wall {v['best_wall']:.3f}x; aten ops per call {v['aten_ops_per_call']['ours']} vs "
                  f"{v['aten_ops_per_call']['baseline']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
