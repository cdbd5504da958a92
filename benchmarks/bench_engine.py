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

A request-level setting ("serving") adds 48 requests at once (a 48-token shared system prompt + a
question, n = 1..4, max_tokens 8..64, T = 1, seeded) with max_num_seqs = 32, and compares: continuous
batching (requests join as slots free), the same engine fed in static waves (a wave joins only an empty
batch: what the engine could do before), and continuous batching without the prefix cache.

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


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


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
        for key, eng in variants.items():
            r = timed(lambda: ours(eng, prompts, temperature=temperature, top_p=top_p, seed=rep))
            runs[key].append(r)
        r = timed(lambda: hf_generate(model, prompts, fixed=fixed, temperature=temperature, top_p=top_p, seed=rep))
        runs["hf"].append(r)
    result = {"setting": name, "temperature": temperature, "top_p": top_p, "fixed_length": fixed}
    for key, rs in runs.items():
        rs = rs[1:]
        result[key] = {
            "tokens_per_s": statistics.median(n / s for s, n in rs),
            "seconds": statistics.median(s for s, _ in rs),
            "tokens": statistics.median(n for _, n in rs),
        }
    result["speedup"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    if "baseline" in result:
        result["ours_vs_baseline"] = result["ours"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
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


def serving_requests(seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(20, VOCAB, (48,), generator=g).tolist()
    out = []
    for i in range(48):
        question = torch.randint(20, VOCAB, (int(torch.randint(8, 17, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(n=1 + i % 4, max_tokens=8 + (i * 7) % 57, seed=seed * 1000 + i)
        out.append((system + question, params))
    return out


def serve(engine, requests, *, waves: bool) -> int:
    """All requests at once (continuous batching), or in waves that join only an empty batch."""
    tokens, queue = 0, list(requests)
    while queue or engine.has_unfinished():
        if queue and (not waves or not engine.has_unfinished()):
            room = 32  # a wave: as many requests as fit in max_num_seqs
            while queue and (not waves or queue[0][1].n <= room):
                prompt, params = queue.pop(0)
                engine.add_request(prompt, params)
                room -= params.n
        tokens += sum(len(o.token_ids) for o in engine.step())
    return tokens


def bench_serving(model, repeats: int) -> dict:
    variants = {
        "continuous": (Engine(model, eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=32), False),
        "static_waves": (Engine(model, eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=32), True),
        "continuous_no_cache": (Engine(model, eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=32, cache_mb=0),
                                False),
    }
    runs = {k: [] for k in variants}
    for rep in range(repeats + 1):
        for key, (eng, waves) in variants.items():
            eng.load_weights()  # an empty prefix cache at the start of every repeat
            runs[key].append(timed(lambda: serve(eng, serving_requests(rep), waves=waves)))
    result = {"setting": "serving", "requests": 48, "max_num_seqs": 32, "system_prompt": 48}
    for key, rs in runs.items():
        rs = rs[1:]
        result[key] = {"tokens_per_s": statistics.median(n / s for s, n in rs),
                       "seconds": statistics.median(s for s, _ in rs), "tokens": statistics.median(n for _, n in rs)}
    cs = variants["continuous"][0].cache_stats()
    result["continuous_cache"] = {"hit_tokens_per_run": cs.hit_tokens / (repeats + 1),
                                  "miss_tokens_per_run": cs.miss_tokens / (repeats + 1)}
    result["continuous_vs_static"] = result["continuous"]["tokens_per_s"] / result["static_waves"]["tokens_per_s"]
    return result


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
    for key in ("continuous", "static_waves", "continuous_no_cache"):
        v = serving[key]
        print(f"{'serving':<16}{key:<20}{v['tokens']:>8.0f}{v['seconds']:>9.3f}{v['tokens_per_s']:>9.0f}")
    print(f"serving: continuous / static waves = {serving['continuous_vs_static']:.2f}x; prefix-cache hits "
          f"{serving['continuous_cache']['hit_tokens_per_run']:.0f} of "
          f"{sum(serving['continuous_cache'].values()):.0f} prompt tokens per run")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
