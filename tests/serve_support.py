"""Test support for `r1kit serve`: a tiny model taught the reasoning format, a server subprocess, a CDP client.

The model is a 2-layer Llama (context 1024) trained for a few seconds to answer four questions in r1kit's
format ("<think> 2 plus 3 is 5 </think> <answer> 5 </answer>" + EOS) under the chat template, so that greedy
replies are known exactly; any other prompt gets random-looking text, which is fine for load and abuse tests.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

QA = {"What is 2+3?": ("2 plus 3 is 5", "5"), "What is 4+4?": ("4 plus 4 is 8", "8"),
      "What is 6+1?": ("6 plus 1 is 7", "7"), "What is 9+9?": ("9 plus 9 is 18", "18")}
# a second turn (the first reply's reasoning left out, as the server does), so multi-turn replies are known too
SECOND_TURN = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
               {"role": "user", "content": "What is 4+4?"}]
MODEL_NAME = "r1-tiny-test"
API_KEY = "sk-test-r1kit"
CONTEXT = 1024


def train_format_model(path: Path, max_steps: int = 1000) -> Path:
    """Build, train and save the test model into `path` (about 5-15 s on 2 cores). Training stops once the
    argmax at every completion position is the target (greedy decoding then reproduces the targets exactly)."""
    import torch

    from helpers import tiny_pair
    from r1kit.model import build_tiny_model, save_model
    from r1kit.config import ModelConfig
    from r1kit.serving.server import default_system_prompt

    _, tok = tiny_pair()
    torch.manual_seed(0)
    model = build_tiny_model(ModelConfig(arch="llama", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                         intermediate_size=128, max_position_embeddings=CONTEXT), tok)
    system = default_system_prompt(tok, "auto")
    rows = []
    chats = [[{"role": "user", "content": q}] for q in QA] + [SECOND_TURN]
    for chat in chats:
        q = chat[-1]["content"]
        r, a = QA[q]
        text = tok.apply_chat_template([{"role": "system", "content": system}, *chat],
                                       add_generation_prompt=True, tokenize=False)
        p = tok(text, add_special_tokens=False).input_ids
        c = tok(f"<think> {r} </think> <answer> {a} </answer>", add_special_tokens=False).input_ids
        rows.append((p, c + [tok.eos_token_id]))
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    labels = torch.full((len(rows), T), -100)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c)  # position t predicts token t+1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    target = labels != -100
    for step in range(max_steps):
        logits = model(ids).logits  # [R, T, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if loss.item() < 0.05 and bool((logits.argmax(-1)[target] == labels[target]).all()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise RuntimeError(f"the serve test model did not learn its replies in {max_steps} steps (loss {loss.item():.3f})")
    model.eval()
    save_model(model, tok, path)
    return path


def cached_format_model(cache) -> Path:
    """`train_format_model` once per (this file, helpers.py, torch, transformers) version, in pytest's cache."""
    import hashlib

    import torch
    import transformers

    here = Path(__file__).parent
    key = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("serve_support.py", "helpers.py")))
    key.update(f"{torch.__version__} {transformers.__version__}".encode())
    folder = cache.mkdir("r1kit-serve") / key.hexdigest()[:16]
    if not (folder / "done").exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        train_format_model(folder)
        (folder / "done").write_text("ok")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path

    def get(self, path: str, key: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> dict:
        return self.get("/health")[1]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(model_dir: Path, log: Path, *args: str, timeout: float = 120.0) -> Server:
    """`python -m r1kit serve` on a free port; returns once /health answers (fails with the log otherwise)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "r1kit", "serve", "--model", str(model_dir), "--port", str(port),
           "--threads", "1", "--served-model-name", MODEL_NAME, *args]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"r1kit serve exited with {proc.returncode}:\n{server.log_text()}")
        try:
            if server.health()["status"] == "ok":
                return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"r1kit serve did not answer /health within {timeout}s:\n{server.log_text()}")


def stop_server(server: Server, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code (-9 when killed)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


# ---- a minimal Chrome DevTools Protocol client (websocket-client) ----

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--mute-audio", "--window-size=1100,900", "--remote-debugging-port=0"]


class Browser:
    """Headless Chromium on `url`, driven over CDP: `js(expr)` evaluates and returns the value."""

    def __init__(self, chromium: str, url: str, profile: Path, timeout: float = 60.0):
        import websocket

        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        ws_url = None
        while ws_url is None and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                ws_url = next((t["webSocketDebuggerUrl"] for t in json.loads(r.read()) if t["type"] == "page"), None)
            time.sleep(0.1)
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.msg_id = 0
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def call(self, method: str, **params) -> dict:
        self.msg_id += 1
        self.ws.send(json.dumps({"id": self.msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.msg_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
