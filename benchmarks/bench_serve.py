"""`r1kit serve` vs `transformers serve --continuous-batching`, side by side in one run, same model and requests.

The model: a random-weight Llama (hidden 256, 4 layers, 4 heads, vocab ~512 from r1kit's tokenizer trained
here, context 2,048, float32), saved as an ordinary HF folder that both servers load. Its EOS logit is pinned
far below the others (lm_head row 0, other rows scaled up), so every request generates exactly max_tokens
on both servers (no `ignore_eos` needed, which transformers serve lacks) and token counts match.

All servers are started at once as subprocesses on free ports (the same --threads for each; their idle CPU
use is recorded) and driven with the real openai client (AsyncOpenAI, max_retries=0), streaming chat
completions, the waves alternating between the servers so that both see the same machine load:
- load: 1, 8 and 64 concurrent streams (each max_tokens 64, different short prompts, T = 1, seeded):
  completion tokens/s over the wave (tokens received / wall time) and time to first token p50/p99;
- the same 64-stream waves on `r1kit serve --engine-in-server` (the engine as a thread of the server process,
  sharing its GIL, instead of its own process), to record what the engine process gains;
- the same 64-stream waves on `r1kit serve --stream-interval 1` (every token its own SSE chunk, as
  transformers serve sends them; the default, auto, sends 4 tokens per chunk at 64 open streams), so that the
  share of the ratio that comes from fewer chunks is on record; the client's CPU seconds per wave are recorded;
- shared prefix: requests sharing a ~1,000-token system prompt, each with its own question, one at a time
  (max_tokens 8): TTFT of the requests after the first (which fills the cache), r1kit with its prefix
  cache on and off (--cache-mb 0), and transformers serve.

Run (the machine's other load changes the absolute figures; the ratios are from one run):
    pip install "transformers[serving]"       # the peer (benchmark only, not a test dependency)
    python benchmarks/bench_serve.py [--threads 1] [--repeats 2] [--only r1kit]
writes benchmarks/results/serve.json and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
CONCURRENCY = (1, 8, 64)
MAX_TOKENS = 64
WORDS = "the a of to and in is it that for on with as was at by an be this which or from are".split()


def build_model(folder: Path) -> Path:
    """A random Llama folder with context 2,048 whose EOS is never sampled (see the module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from r1kit.model import save_model, train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(40)) for _ in range(400)]
    tok = train_tokenizer(texts, 512)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=688, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
        model.lm_head.weight[tok.eos_token_id] = 0.0
        model.lm_head.weight[tok.pad_token_id] = 0.0
    save_model(model, tok, folder)
    return folder


def r1kit_command(model_dir: Path, threads: int, max_num_seqs: int) -> list[str]:
    """`r1kit serve` on the bench model. --system-prompt "": the folder is one of r1kit's models, for which the
    server would put the R1-Zero instruction (60 tokens) before every chat that brings no system message;
    transformers serve adds none, and both servers must see the same prompts."""
    return [sys.executable, "-m", "r1kit", "serve", "--model", str(model_dir), "--served-model-name", "bench",
            "--threads", str(threads), "--max-num-seqs", str(max_num_seqs), "--system-prompt", ""]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path, threads: int, timeout: float = 300.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd[:3]} did not answer /health in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_stream(client, model: str, messages: list[dict], max_tokens: int, seed: int,
                     prompt_tokens: list | None = None, chunk_counts: list | None = None) -> tuple[float, int]:
    """(seconds to the first text delta, completion tokens) of one streamed chat completion; the server's
    count of prompt tokens is appended to `prompt_tokens` when it reports usage, the number of SSE chunks
    received (role, text, finish and usage chunks) to `chunk_counts`."""
    t0 = time.perf_counter()
    ttft, pieces, usage, chunks = None, 0, None, 0
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=1.0, seed=seed, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text = (c.delta.content or "") + (getattr(c.delta, "reasoning_content", None) or "")
            if text:
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    tokens = usage.completion_tokens if usage is not None and usage.completion_tokens else pieces
    if prompt_tokens is not None and usage is not None and usage.prompt_tokens:
        prompt_tokens.append(usage.prompt_tokens)
    if chunk_counts is not None:
        chunk_counts.append(chunks)
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def load_wave(base_url: str, model: str, concurrency: int, wave: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
        msgs = [[{"role": "user", "content": f"question {wave}-{i}: " + " ".join(random.Random(i).choices(WORDS, k=12))}]
                for i in range(concurrency)]
        t0, cpu0, prompt_tokens, chunk_counts = time.perf_counter(), time.process_time(), [], []
        res = await asyncio.gather(*(one_stream(client, model, m, MAX_TOKENS, i, prompt_tokens, chunk_counts)
                                     for i, m in enumerate(msgs)), return_exceptions=True)
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    errors = [repr(r) for r in res if isinstance(r, BaseException)]
    ok = [r for r in res if not isinstance(r, BaseException)]
    ttfts = sorted(t for t, _ in ok)
    tokens = sum(n for _, n in ok)
    return {"concurrency": concurrency, "errors": len(errors), "error_samples": errors[:2], "tokens": tokens,
            "seconds": wall, "tokens_per_s": round(tokens / wall, 1), "ttfts": ttfts, "prompt_tokens": prompt_tokens,
            "chunks": chunk_counts, "client_cpu_s": client_cpu}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def shared_prefix_text(tokenizer, n_tokens: int = 1000) -> str:
    rng = random.Random(1)
    words = []
    while len(tokenizer(" ".join(words)).input_ids) < n_tokens:
        words += [rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(20)]
    while len(tokenizer(" ".join(words)).input_ids) > n_tokens:
        words.pop()
    return " ".join(words)


async def prefix_ttft(base_url: str, model: str, prefix: str, requests: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
        ttfts = []
        for i in range(requests + 1):
            msgs = [{"role": "system", "content": prefix}, {"role": "user", "content": f"question number {i}?"}]
            t, _ = await one_stream(client, model, msgs, 8, i)
            if i:  # the first request fills the cache
                ttfts.append(t)
        ttfts.sort()
    return {"requests": requests, "ttft_p50_ms": round(1000 * _pct(ttfts, 50), 1),
            "ttft_mean_ms": round(1000 * statistics.mean(ttfts), 1), "ttft_p99_ms": round(1000 * _pct(ttfts, 99), 1)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live child processes (r1kit's engine process), from Linux
    /proc, to check that an idle server does not spin."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except OSError:  # it exited meanwhile
                pass
    return total


def merge_waves(waves: list[dict]) -> dict:
    """Several waves of one setting -> one row: tokens/s over all of them, TTFT percentiles over all requests."""
    tokens, seconds = sum(w["tokens"] for w in waves), sum(w["seconds"] for w in waves)
    ttfts = sorted(t for w in waves for t in w["ttfts"])
    return {"concurrency": waves[0]["concurrency"], "waves": len(waves), "errors": sum(w["errors"] for w in waves),
            "error_samples": [e for w in waves for e in w["error_samples"]][:2], "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_s_per_wave": [w["tokens_per_s"] for w in waves],
            "ttft_p50_ms": round(1000 * _pct(ttfts, 50), 1), "ttft_p99_ms": round(1000 * _pct(ttfts, 99), 1),
            "prompt_tokens_mean": _mean([p for w in waves for p in w["prompt_tokens"]]),
            "chunks_per_request_mean": _mean([c for w in waves for c in w["chunks"]]),
            "client_cpu_s_per_wave": [round(w["client_cpu_s"], 2) for w in waves]}


def _mean(xs: list[float]) -> float | None:
    return round(statistics.mean(xs), 1) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each server (1: on a loaded 2-core machine, 2 threads spin-wait and "
                         "both servers slow down many times)")
    ap.add_argument("--repeats", type=int, default=2, help="waves per setting, alternating the servers")
    ap.add_argument("--prefix-requests", type=int, default=8)
    ap.add_argument("--only", choices=["r1kit"], default=None, help="skip the peer")
    ap.add_argument("--bf16", action="store_true",
                    help="also r1kit with --engine-dtype bf16 (bf16 matmuls, float32 weights and KV cache) at 64 "
                         "streams (for CPUs with native bf16). A second transformers server (--dtype bfloat16) "
                         "beside the first was killed for memory here: its paged cache sizes itself to free RAM")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default benchmarks/results/serve.json)")
    ns = ap.parse_args()
    from r1kit.model import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_dir = build_model(tmp / "model")
    prefix = shared_prefix_text(load_tokenizer(model_dir))
    r1 = r1kit_command(model_dir, ns.threads, 64)
    commands = {"r1kit": r1, "r1kit_no_cache": [*r1, "--cache-mb", "0"],
                "r1kit_every_token": [*r1, "--stream-interval", "1"],
                "r1kit_engine_in_server": [*r1, "--engine-in-server"]}
    model_ids = {"r1kit": "bench", "r1kit_no_cache": "bench", "r1kit_every_token": "bench",
                 "r1kit_engine_in_server": "bench", "transformers": str(model_dir)}
    load_settings = {"r1kit": CONCURRENCY, "r1kit_every_token": (64,), "r1kit_engine_in_server": (64,),
                     "transformers": CONCURRENCY}
    if ns.only is None:
        commands["transformers"] = ["transformers", "serve", str(model_dir), "--continuous-batching", "--device",
                                    "cpu", "--dtype", "float32", "--host", "127.0.0.1"]
    if ns.bf16:
        commands["r1kit_bf16"] = [*r1, "--engine-dtype", "bf16"]
        model_ids["r1kit_bf16"], load_settings["r1kit_bf16"] = "bench", (64,)
    results: dict = {"model": "random Llama, hidden 256, 4 layers, context 2048, float32", "max_tokens": MAX_TOKENS,
                     "threads": ns.threads, "repeats": ns.repeats, "cpu_count": os.cpu_count(),
                     "load_average_at_start": os.getloadavg(), "commands": {}}
    procs, urls = {}, {}
    try:
        for name, cmd in commands.items():  # all servers up at once: the waves alternate between them
            port = free_port()
            cmd = [*cmd, "--port", str(port)]
            results["commands"][name] = " ".join(cmd)
            procs[name] = start(cmd, port, tmp / f"{name}.log", ns.threads)
            urls[name] = f"http://127.0.0.1:{port}/v1"
            asyncio.run(load_wave(urls[name], model_ids[name], 2, -1))  # warm-up
        before = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        time.sleep(3)
        results["idle_cpu_s_per_s"] = {n: round((cpu_seconds(p.pid) - before[n]) / 3, 3) for n, p in procs.items()}
        waves: dict = {n: {c: [] for c in load_settings[n]} for n in procs if n in load_settings}
        for rep in range(ns.repeats):
            for c in CONCURRENCY:
                names = [n for n in waves if c in waves[n]]
                order = sorted(names) if rep % 2 == 0 else sorted(names, reverse=True)
                for name in order:
                    waves[name][c].append(asyncio.run(load_wave(urls[name], model_ids[name], c, rep * 1000 + c)))
        for name in waves:
            results[name] = {"load": [merge_waves(waves[name][c]) for c in load_settings[name]]}
        for name in procs:
            if name in ("r1kit_every_token", "r1kit_engine_in_server", "r1kit_bf16"):
                continue
            results.setdefault(name, {})["shared_prefix"] = asyncio.run(
                prefix_ttft(urls[name], model_ids[name], prefix, ns.prefix_requests))
    finally:
        for name, proc in procs.items():
            stop(proc)
            results.setdefault(name, {})["log_tail"] = (tmp / f"{name}.log").read_text(errors="replace")[-800:]
    results["load_average_at_end"] = os.getloadavg()
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    tmp_out.replace(out)
    print_table(results)


def print_table(results: dict) -> None:
    print(f"load average {results['load_average_at_start']} -> {results['load_average_at_end']}, "
          f"idle CPU {results['idle_cpu_s_per_s']}")
    print(f"{'server':<19}{'streams':>8}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'errors':>8}"
          f"{'chunks/req':>12}{'client CPU s/wave':>19}")
    for name in ("r1kit", "r1kit_engine_in_server", "r1kit_every_token", "r1kit_bf16", "transformers"):
        for row in results.get(name, {}).get("load", []):
            print(f"{name:<19}{row['concurrency']:>8}{row['tokens_per_s']:>9}{row['ttft_p50_ms']:>13}"
                  f"{row['ttft_p99_ms']:>13}{row['errors']:>8}{row['chunks_per_request_mean']!s:>12}"
                  f"{statistics.mean(row['client_cpu_s_per_wave']):>19.2f}")
    print("shared ~1,000-token prefix, one request at a time, TTFT after the first request:")
    for name in ("r1kit", "r1kit_no_cache", "transformers"):
        sp = results.get(name, {}).get("shared_prefix")
        if sp:
            print(f"  {name:<16} p50 {sp['ttft_p50_ms']} ms  p99 {sp['ttft_p99_ms']} ms")


if __name__ == "__main__":
    main()
