"""Start `r1kit serve`: load the model once, build the engine with `make_engine`, run uvicorn.

SIGTERM / Ctrl-C: the server stops accepting connections and new requests (503 on open keep-alive
connections), lets requests in flight finish for `shutdown_grace_s` seconds, then ends the remaining ones
(streams get an error event and close) and exits with status 0. A second signal exits at once.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import uvicorn

from r1kit.serving.protocol import Limits
from r1kit.types import R1KitError

log = logging.getLogger("r1kit.serve")


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model folder's name
    max_num_seqs: int = 256  # running samples (the engine's continuous batch)
    cache_mb: float = 256.0  # the engine's prefix-cache budget
    backend: str = "local"  # the engine: local (r1kit's) | vllm (in-process vLLM, the `vllm` extra)
    max_waiting: int = 256  # samples admitted beyond max_num_seqs before 429s
    limits: Limits = Limits()
    system_prompt: str | None = "auto"  # "auto": r1kit's R1-Zero instruction for r1kit's chat template
    dtype: str = "float32"
    # engine.dtype: what the sampling forward computes in. "bf16" with float32 weights: the local engine keeps the
    # weights and KV cache in float32 and runs its matmuls on bf16 copies (about 2.3x the fp32 matmul rate on a
    # CPU with native bf16, far slower where bf16 is emulated); "auto" = the weights' dtype.
    engine_dtype: str = "auto"
    device: str = "auto"  # auto = cuda when available
    threads: int = 0
    stream_interval: int = 0  # tokens per streamed chunk; 0 = auto (r1kit.serving.app.Generation.interval)
    shutdown_grace_s: float = 5.0
    log_level: str = "warning"
    engine_process: bool = True  # the local engine in a process of its own (no GIL shared with the HTTP side)


def default_system_prompt(tokenizer, option: str | None) -> str | None:
    """The system message put before chats that bring none.

    "auto": r1kit's models were trained on the R1-Zero prompt, whose instruction line is exactly the system
    message of r1kit's chat template (model.CHAT_TEMPLATE): with it, a chat renders to the training prompt.
    Other models' templates bring their own defaults, so "auto" adds nothing there."""
    from r1kit.model import CHAT_TEMPLATE
    from r1kit.templates import R1_ZERO_TEMPLATE

    if option != "auto":
        return option or None
    if getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE:
        return R1_ZERO_TEMPLATE.split("\nUser:")[0]
    return None


def build_engine(opts: ServeOptions):
    """Load the model and build the engine: -> (engine, tokenizer, context). Runs where the engine runs: in the
    engine process (r1kit.serving.engine_process) or, with `engine_process=False`, in the server's own."""
    import torch

    from r1kit.policy import Policy

    if opts.threads:
        torch.set_num_threads(opts.threads)
    policy = Policy.load(opts.model, device=opts.device, dtype=opts.dtype)  # a bad folder: an error naming it
    model = policy.module.eval()
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int) or context < 2:
        raise R1KitError(f"model {opts.model!r}: its config has no usable max_position_embeddings ({context!r})")
    engine = policy.make_engine(opts.backend, max_num_seqs=opts.max_num_seqs, cache_mb=opts.cache_mb, dtype=opts.engine_dtype,
                                **({"model_name": opts.model} if opts.backend == "vllm" else {}))
    return engine, policy.tokenizer, context


def build_state(opts: ServeOptions):
    """Start the engine (its own process by default), then build the ServerState (no server started)."""
    from r1kit.model import CHAT_TEMPLATE
    from r1kit.serving.app import ServerState
    from r1kit.serving.engine_loop import EngineLoop
    from r1kit.serving.engine_process import EngineProcess

    if opts.engine_process and opts.backend == "local":
        engine = EngineProcess(opts)  # the child's R1KitError (a bad folder) is raised here, as in one process
        tok, context = engine.info["tokenizer"], engine.info["context"]
    else:  # vLLM runs its own engine-core process: its engine object stays in the server's process
        engine, tok, context = build_engine(opts)
    if not getattr(tok, "chat_template", None):
        log.warning("%s has no chat template: using r1kit's (User:/Assistant: turns)", opts.model)
        tok.chat_template = CHAT_TEMPLATE
    loop = EngineLoop(engine, max_pending=opts.max_num_seqs + opts.max_waiting)
    name = opts.served_model_name or Path(opts.model).resolve().name
    limits = replace(opts.limits, max_n=min(opts.limits.max_n, opts.max_num_seqs))  # a request's n runs at once
    return ServerState(loop=loop, tokenizer=tok, model_name=name, context=context, limits=limits,
                       api_key=opts.api_key or None, default_system=default_system_prompt(tok, opts.system_prompt),
                       stream_interval=opts.stream_interval)


def serve(opts: ServeOptions) -> None:
    """Run the server until SIGTERM/SIGINT."""
    from r1kit.serving.app import build_app

    state = build_state(opts)
    app = build_app(state)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                            timeout_graceful_shutdown=int(opts.shutdown_grace_s) + 5, lifespan="on")
    server = _Server(config, state, opts.shutdown_grace_s)
    print(f"r1kit serve: {state.model_name!r} on http://{opts.host}:{opts.port} (context {state.context}, "
          f"max_num_seqs {opts.max_num_seqs}, key {'required' if state.api_key else 'not required'})", flush=True)
    server.run()
    if server.timer is not None:
        server.timer.cancel()
    print("r1kit serve: stopped", flush=True)


class _Server(uvicorn.Server):
    """uvicorn's server, draining the engine on the first signal and ending it after the grace period."""

    def __init__(self, config, state, grace_s: float):
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self.timer: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        loop = self.state.loop
        if not loop.draining:
            loop.draining = True
            self.timer = threading.Timer(self.grace_s, loop.stop)
            self.timer.daemon = True
            self.timer.start()
        else:
            loop.stop(timeout=1.0)
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after its shutdown (exit status -15); a drained server exits 0
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig in captured:
            captured.remove(sig)


def main(argv: list[str]) -> int:
    """`r1kit serve ...` (see the module docstring of r1kit.serving.app)."""
    import argparse
    import os

    from r1kit.engine.inputs import ENGINE_DTYPES

    ap = argparse.ArgumentParser(prog="r1kit serve", description="OpenAI/DeepSeek-compatible reasoning server "
                                 "(/v1/chat/completions, /v1/completions, /v1/models, /health) and a chat page at /.")
    ap.add_argument("--model", required=True, help="HF causal-LM folder")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("R1KIT_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $R1KIT_API_KEY, else none)")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="samples decoded together (continuous batch)")
    ap.add_argument("--cache-mb", type=float, default=256.0, help="prefix-cache budget (MiB)")
    ap.add_argument("--backend", default="local", choices=["local", "vllm"],
                    help="generation engine: r1kit's own, or in-process vLLM (the `vllm` extra)")
    ap.add_argument("--max-waiting", type=int, default=256, help="samples queued beyond --max-num-seqs before 429s")
    ap.add_argument("--max-body-mb", type=float, default=2.0, help="request body limit (413 above)")
    ap.add_argument("--max-messages", type=int, default=512)
    ap.add_argument("--max-n", type=int, default=16, help="largest n per request")
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on max_tokens (default: the context)")
    ap.add_argument("--system-prompt", default="auto",
                    help="system message for chats without one; 'auto' = r1kit's R1-Zero instruction for r1kit "
                         "models, none for others; '' = none")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the weights' dtype")
    ap.add_argument("--engine-dtype", default="auto", choices=sorted(ENGINE_DTYPES),
                    help="what sampling computes in: bf16 = bf16 copies of float32 weights, float32 KV cache "
                         "(fast on CPUs with native bf16); auto = the weights' dtype")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--stream-interval", type=int, default=0,
                    help="tokens per streamed chunk: 0 = auto (open samples // 16, at least 1, at most 8: 1 below 32 "
                         "open samples, 4 at 64; a stream's first text and its end go out at once), 1 = every token")
    ap.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds open requests get after SIGTERM")
    ap.add_argument("--engine-in-server", action="store_true",
                    help="run the local engine as a thread of the server process instead of its own process "
                         "(slower under load: the two share the GIL; the vllm backend always runs this way)")
    ap.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    ns = ap.parse_args(argv)
    if ns.stream_interval < 0:
        raise R1KitError(f"--stream-interval must be >= 0, got {ns.stream_interval}")
    for name in ("port", "max_num_seqs", "max_waiting", "max_messages", "max_n"):
        if getattr(ns, name) < (0 if name == "port" else 1):
            raise R1KitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    if ns.max_tokens is not None and ns.max_tokens < 1:
        raise R1KitError(f"--max-tokens must be >= 1, got {ns.max_tokens}")
    if not ns.max_body_mb > 0 or not ns.cache_mb >= 0:
        raise R1KitError("--max-body-mb must be > 0 and --cache-mb >= 0")
    limits = Limits(max_body_bytes=int(ns.max_body_mb * 1024 * 1024), max_messages=ns.max_messages, max_n=ns.max_n,
                    max_tokens=ns.max_tokens)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(ServeOptions(model=ns.model, host=ns.host, port=ns.port, api_key=ns.api_key,
                       served_model_name=ns.served_model_name, max_num_seqs=ns.max_num_seqs, cache_mb=ns.cache_mb,
                       backend=ns.backend,
                       max_waiting=ns.max_waiting, limits=limits, system_prompt=ns.system_prompt, dtype=ns.dtype,
                       engine_dtype=ns.engine_dtype,
                       device=ns.device, threads=ns.threads, stream_interval=ns.stream_interval,
                       shutdown_grace_s=ns.shutdown_grace, log_level=ns.log_level,
                       engine_process=not ns.engine_in_server))
    return 0
