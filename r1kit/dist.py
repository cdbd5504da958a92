"""Data parallel on torchrun: process-group set-up, rank/world helpers, shares of a global batch, per-stream
seeds, reductions, model wrapping (DDP or FSDP2) and crash reporting. Everything is a no-op in one process.

    torchrun --nproc-per-node 2 -m r1kit zero                 # 2 ranks on this machine (gloo on CPU)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m r1kit sft ...

How a job is cut (the same config gives the same run on 1 process or N):
- batch sizes in the config are GLOBAL; each rank takes a contiguous, disjoint share (`share`) of every
  global batch: GRPO takes whole prompt groups (group advantages stay local), SFT whole packed rows,
  pretraining and the reward model whole documents / pairs. A size the world does not divide is an error
  naming the config field.
- losses are divided by the GLOBAL normaliser (token counts summed over ranks by `all_reduce_sum`), so
  each rank's gradient is a partial sum of the global gradient and gradients are SUMMED across ranks,
  not averaged: DDP gets a sum comm hook, FSDP2 a gradient divide factor of 1 (`wrap`).
- random streams that must not depend on the rank layout are keyed by what they draw for
  (`stream_seed(seed, "group", step, index)`), not by the rank.
- metrics are reduced over ranks (`reduce_metrics`); only rank 0 logs, plots and writes checkpoints
  (`is_main`), and checkpoints hold full (unsharded) tensors, so a run resumes on any world size that
  divides its batch sizes.

Crashes: `run_main` catches an exception on any rank, prints `r1kit: rank N failed: ...` with the
traceback and exits non-zero; torchrun's agent then stops the other ranks (and collectives fail fast on a
closed peer connection; the process-group timeout, R1KIT_DIST_TIMEOUT seconds, bounds the rest).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as tdist

from r1kit.types import R1KitError

STRATEGIES = ("ddp", "fsdp2")
DEFAULT_TIMEOUT_S = 1800.0  # the NCCL/gloo default; lower it (R1KIT_DIST_TIMEOUT) to fail faster on a hang


# ----------------------------------------------------------------------------- the process group


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment):
    NCCL on CUDA, gloo on CPU. Returns True when running distributed. Idempotent; a no-op for WORLD_SIZE 1."""
    if is_initialized():
        return True
    if env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise R1KitError(f"WORLD_SIZE={env_world_size()} but {missing} unset: launch with torchrun")
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("R1KIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return True


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in one process): the rank that logs, plots and writes files."""
    return rank() == 0


def rank_tag() -> str:
    """" (rank N)" under torchrun, "" in one process: for messages every rank may print."""
    return f" (rank {rank()})" if env_world_size() > 1 else ""


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def run_main(fn: Callable[[], int]) -> int:
    """Run a command's body under torchrun: an uncaught exception (other than R1KitError, which the CLI
    prints as a clean error) prints `r1kit: rank N failed: ...` and the traceback to stderr and ends the
    process with status 1, so torchrun names the failing rank and stops the others. In one process the
    exception propagates unchanged."""
    try:
        code = fn()
    except (R1KitError, KeyboardInterrupt):  # the caller prints these as clean messages
        raise
    except Exception as e:  # every other failure must name its rank, then end the job
        if env_world_size() <= 1:
            raise
        print(f"r1kit: rank {rank()} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        _leave(1)
    if not is_initialized() or env_world_size() <= 1:
        return code  # one process (vLLM's in-process engine may have made its own one-rank group: not ours)
    # All ranks finish together, then leave without the interpreter's teardown: gloo's threads could
    # otherwise abort a process at exit ("terminate called without an active exception").
    barrier()
    shutdown()
    _leave(code or 0)


def _leave(code: int) -> None:
    """Exit now: run the atexit handlers (worker pools, sandboxes), flush, then skip the interpreter's
    teardown, where gloo threads or a peer's pending collective could abort or block this process."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ----------------------------------------------------------------------------- shares and seeds


def share(n: int, field: str, *, world_size: int | None = None, rank_: int | None = None) -> slice:
    """This rank's contiguous share of `n` global items (`field` names the config knob in the error)."""
    w = world() if world_size is None else world_size
    r = rank() if rank_ is None else rank_
    if n % w:
        raise R1KitError(f"{field}={n} must be divisible by the number of ranks ({w}): each rank takes an equal "
                         f"share of the global batch")
    k = n // w
    return slice(r * k, (r + 1) * k)


def even_share(n: int, *, world_size: int | None = None, rank_: int | None = None) -> slice:
    """This rank's contiguous share of `n` items when `n` need not divide: sizes differ by at most one
    (the first `n % world` ranks take one more); a share may be empty when n < world."""
    w = world() if world_size is None else world_size
    r = rank() if rank_ is None else rank_
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def take_share(items: Sequence, field: str) -> list:
    return list(items[share(len(items), field)])


def stream_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed for the random stream named by (seed, *keys), e.g. ("group", step, index): the same
    stream on whichever rank draws it, and independent of every other stream."""
    text = "/".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rank_seed(seed: int) -> int:
    """The seed of this rank's own stream (rank 0 of one process keeps `seed` itself)."""
    return seed if rank() == 0 else stream_seed(seed, "rank", rank())


# ----------------------------------------------------------------------------- reductions


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor:
    """Sum over ranks (a new tensor; float64 for Python numbers, so token counts stay exact)."""
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).clone()
    if world() > 1:
        dev = t.device
        t = t.to(_comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t = t.to(dev)
    return t


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, in rank order (the global batch's row order). Every rank
    must pass the same shape (an equal share of the batch)."""
    if world() <= 1:
        return x
    dev = x.device
    y = x.contiguous().to(_comm_device())
    parts = [torch.empty_like(y) for _ in range(world())]
    tdist.all_gather(parts, y)
    return torch.cat(parts).to(dev)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] in one process)."""
    if world() <= 1:
        return [obj]
    out: list[Any] = [None] * world()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world() <= 1:
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_metrics(metrics: dict[str, float], weight: float = 1.0, summed: Sequence[str] = ()) -> dict[str, float]:
    """Combine each rank's metrics into the global ones: keys ending in `_max` by max, `_min` by min, keys
    in `summed` by sum, the rest by the mean weighted by `weight` (e.g. the rank's rows or tokens).
    Every rank gets the same dict; in one process it is `metrics` (as floats)."""
    parts = gather_objects(({k: float(v) for k, v in metrics.items()}, float(weight)))
    if len(parts) == 1:
        return parts[0][0]
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m, _ in parts for k in m):
        have = [(m[key], w) for m, w in parts if key in m]
        values = [v for v, _ in have]
        if key.endswith("_max"):
            out[key] = max(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key in summed:
            out[key] = sum(values)
        else:
            total = sum(w for _, w in have)
            out[key] = sum(v * w for v, w in have) / total if total else sum(values) / len(values)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- wrapping


def _sum_hook(_state, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size)."""
    fut = tdist.all_reduce(bucket.buffer(), op=tdist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(module: torch.nn.Module, strategy: str = "ddp", *, field: str = "dist.strategy") -> torch.nn.Module:
    """The module to run training forwards through: DDP(module) or FSDP2 (fully_shard per decoder layer, then
    the root; in place, so `module` itself becomes the sharded one). Gradients are SUMMED over ranks (the
    trainers divide losses by global normalisers). In one process: `module` unchanged."""
    if strategy not in STRATEGIES:
        raise R1KitError(f"{field}={strategy!r} is unknown; expected one of {list(STRATEGIES)}")
    if world() <= 1:
        return module
    device = next(module.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers (RoPE tables) are the same on every rank: no broadcast before each forward
        ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world(),))
    layers = _decoder_layers(module)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    for m in [*layers, module]:  # the settings are per sharded module
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return module


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: HF `no_split_modules` classes, else every ModuleList's items."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for ml in module.modules() if isinstance(ml, torch.nn.ModuleList) for m in ml]
    return layers


def prepare(policy, strategy: str = "ddp", field: str = "dist.strategy") -> None:
    """Wrap a Policy for data parallel when running on several ranks and it has no wrapper yet (call before
    its optimizer is made). A no-op in one process. Trainers call it, so a policy built anywhere trains DP."""
    if world() > 1 and policy.wrapper is None:
        policy.wrap(lambda m: wrap(m, strategy, field=field))


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: inside `grad_sync(m, False)` a DDP backward keeps its gradient local (the
    last micro-batch, with sync=True, all-reduces the accumulated sum once)."""
    if not sync and hasattr(module, "no_sync") and type(module).__name__ == "DistributedDataParallel":
        with module.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def full_params(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, an FSDP2-sharded module holds its full parameters as plain tensors (the engine
    samples from them and reads them in place); resharded on exit. A no-op for other modules. Collective:
    every rank enters it."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
        # forwards inside the block (the engine's HF path, evaluation on rank 0 alone) must not reshard, or
        # the next forward would all-gather: a collective the other ranks never join
        m.set_reshard_after_forward(False)
    try:
        yield module
    finally:
        for m in sharded:
            m.set_reshard_after_forward(True)  # as `wrap` shards them
            m.reshard()


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with full tensors. For an FSDP2-sharded module it is gathered (a collective:
    every rank calls it) onto rank 0's CPU, and the other ranks get {}: rank 0 is the one that writes."""
    module = unwrap(module)
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """`module.load_state_dict(weights, strict=False)` for full tensors, also into an FSDP2-sharded module
    (each rank keeps its shard). Returns (missing, unexpected) keys."""
    module = unwrap(module)
    if not is_sharded(module):
        return module.load_state_dict(weights, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(module, dict(weights), options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict: `optimizer.state_dict()`, or for FSDP2 the full (unsharded) one keyed by
    parameter names, on rank 0 ({} elsewhere; a collective). `load_full_optimizer_state` reads either form."""
    module = unwrap(module)
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `full_optimizer_state`: every rank passes the full state, FSDP2 keeps its shard."""
    module = unwrap(module)
    by_name = any(isinstance(k, str) for k in state.get("state", {}))
    if not is_sharded(module) and not by_name:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # a plain checkpoint (one process or DDP) into FSDP2: key its state by parameter name
        state = _state_by_name(module, optimizer, state)
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _state_by_name(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An `optimizer.state_dict()` (parameters numbered in optimizer order) keyed by parameter names."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}
