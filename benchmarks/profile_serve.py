"""Where `r1kit serve`'s time goes at 64 streams: per-thread CPU seconds per wave, engine steps, client CPU.

Starts `r1kit serve` on bench_serve.py's model (hidden 256, 4 layers, every request makes exactly 64
tokens), drives --waves waves of --streams concurrent streamed chat completions with the openai client, and
prints per wave: tok/s, wall seconds, the client's CPU seconds, the server's CPU seconds per thread (from
/proc; "main" is the event loop; the engine's threads are under "engine:", or the other busy thread with
--engine-in-server) and the engine steps taken. With
--py-spy the server runs under `py-spy record --format raw` (pip install py-spy) and the raw profile is written
to --out. Linux only. Run:
    python benchmarks/profile_serve.py [--waves 3] [--streams 64] [--py-spy --out /tmp/serve.prof] [-- --engine-in-server]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as B  # noqa: E402


def thread_cpu(pid: int, label: str = "") -> dict[str, float]:
    """CPU seconds (user + system) of each thread of `pid` and of its child processes (r1kit's engine process,
    labelled "engine:"); a process's main thread is called "main"."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = Path(f"/proc/{pid}/task/{tid}")
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = "main" if int(tid) == pid else tid
        out[label + name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for child in (task / "children").read_text().split():
            out.update(thread_cpu(int(child), "engine:"))
    return out


def steps(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return json.load(r)["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--out", default="serve.prof")
    ap.add_argument("server_args", nargs="*", help="more `r1kit serve` arguments, after --: -- --engine-in-server")
    ns = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="profile_serve_"))
    model = B.build_model(tmp / "model")
    port = B.free_port()
    cmd = [*B.r1kit_command(model, ns.threads, ns.streams), *ns.server_args, "--port", str(port)]
    if ns.py_spy:
        cmd = ["py-spy", "record", "-r", "200", "--format", "raw", "-o", ns.out, "--", *cmd]
    proc = B.start(cmd, port, tmp / "server.log", ns.threads)
    server_pid = proc.pid
    if ns.py_spy:  # py-spy's child is the server
        server_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    url = f"http://127.0.0.1:{port}/v1"
    try:
        asyncio.run(B.load_wave(url, "bench", 2, -1))  # warm-up
        for wave in range(ns.waves):
            cpu0, client0, steps0 = thread_cpu(server_pid), time.process_time(), steps(port)
            res = asyncio.run(B.load_wave(url, "bench", ns.streams, wave))
            cpu1, client = thread_cpu(server_pid), time.process_time() - client0
            busy = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) >= 0.01}
            print(f"wave {wave}: {res['tokens_per_s']} tok/s, {res['seconds']:.2f} s, errors {res['errors']}, "
                  f"steps {steps(port) - steps0}, client CPU {client:.2f} s, server CPU by thread {busy}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        proc.send_signal(signal.SIGINT if ns.py_spy else signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
