"""The Policy: the model being trained, built ONCE by a recipe and passed to every trainer and engine.

    policy = Policy.from_config(cfg, "runs/zero-tiny/base")      # model.device/dtype/..., the lora section
    policy = Policy.load("some/hf-folder", device="cuda", lora=LoraConfig(r=8))
    policy = Policy(module, tokenizer, device="cpu")              # a model built in memory (tests, stage 0)

What lives where (one attribute per concern, so other code never guesses):

    policy.module     the unwrapped Hugging Face model (with LoRA layers injected when LoRA is on). The engine,
                      checkpoints, logprob references and `save` read it; it is never a DDP/FSDP wrapper.
    policy.model      what training forwards go through: `policy.wrapper` when one is set, else `module`.
    policy.wrapper    None, or the data-parallel wrapper (DDP / FSDP2) that `policy.wrap(fn)` installs:
                      r1kit.dist calls `policy.wrap(lambda m: DistributedDataParallel(m, ...))`; for FSDP2,
                      whose `fully_shard` works in place and returns the module, the same call applies.
    policy.peft       the peft `PeftModel` when LoRA is on (adapters, disable_adapter, merge), else None.
    policy.device     a torch.device: `device="auto"` picks CUDA when present, else the CPU. Every tensor a
                      training loop creates goes there (`policy.to_device`).
    policy.optimizer  AdamW over the trainable parameters, made by `make_optimizer` (the trainer's settings).

Mixed precision (`model.mixed_precision=bf16`) is bf16 autocast around training forwards (`policy.autocast()`)
with the fp32 weights as master weights; the default, "fp32", changes nothing, so CPU float32 runs stay
bit-identical to what they were before the policy existed.

The reference model of the KL penalty: with LoRA it is the same network with its adapters disabled
(`with policy.reference() as ref:`, no second copy); without LoRA, `keep_reference()` keeps a frozen copy of
the weights at the time it is called (a trainer calls it before it trains or resumes).

Checkpoints: `save(folder)` writes a full HF folder, or only the adapter with LoRA; `load_weights(folder)`
reads either back (single or sharded safetensors). `export_merged(folder)` writes a plain HF folder with the
adapter merged in, which every verb loads (r1kit export --merge).
"""
from __future__ import annotations

import copy
import resource
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from r1kit import dist
from r1kit.config import LoraConfig, ModelConfig
from r1kit.types import R1KitError

MIXED_PRECISION = {"fp32": None, "bf16": torch.bfloat16}  # not "no": YAML reads it as false
DTYPES = ("float32", "bfloat16", "float16")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; an unusable device is an R1KitError naming it."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise R1KitError(f"model.device={name!r} is not a device; expected auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise R1KitError(f"model.device={name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise R1KitError(f"model.device={name!r} but CUDA is not available here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise R1KitError(f"model.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def check_policy_options(model: ModelConfig, lora: LoraConfig | None = None) -> None:
    """Raise R1KitError naming each `model.*` / `lora.*` field at fault."""
    problems = []
    if model.dtype not in DTYPES:
        problems.append(f"model.dtype={model.dtype!r} is unknown; expected one of {list(DTYPES)}")
    if model.mixed_precision not in MIXED_PRECISION:
        problems.append(f"model.mixed_precision={model.mixed_precision!r}; expected one of {list(MIXED_PRECISION)}")
    if model.mixed_precision != "fp32" and model.dtype != "float32":
        problems.append(f"model.mixed_precision={model.mixed_precision!r} keeps fp32 master weights: it needs "
                        f"model.dtype=float32, got {model.dtype!r}")
    if lora is not None:
        if lora.r < 0:
            problems.append(f"lora.r must be >= 0 (0 = off), got {lora.r}")
        if lora.r > 0 and not lora.alpha > 0:
            problems.append(f"lora.alpha must be > 0, got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {lora.dropout}")
        if lora.r > 0 and not lora.target_modules:
            problems.append("lora.target_modules is empty; give module names such as [q_proj, v_proj] or [all-linear]")
    if problems:
        raise R1KitError("; ".join(problems))
    resolve_device(model.device)


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Without it (AVX2 only), torch emulates
    bf16 matmuls: measured 0.26 against 179 GFLOP/s in fp32 on a 2-core AVX2 machine."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def cpu_bf16_note() -> str:
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX"


class Policy:
    """See the module docstring: the model, tokenizer, device, precision, wrapping, optimizer, checkpoints."""

    def __init__(self, module: nn.Module, tokenizer, *, device: str | torch.device = "auto",
                 mixed_precision: str = "fp32", gradient_checkpointing: bool = False, lora: LoraConfig | None = None,
                 task_type: str = "CAUSAL_LM", seed: int = 0):
        if mixed_precision not in MIXED_PRECISION:
            raise R1KitError(f"model.mixed_precision={mixed_precision!r}; expected one of {list(MIXED_PRECISION)}")
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type {task_type!r}; expected one of {TASK_TYPES}")
        self.device = resolve_device(device)
        self.tokenizer = tokenizer
        self.mixed_precision = mixed_precision
        if mixed_precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(f"model.mixed_precision=bf16 on a CPU without native bf16 ({cpu_bf16_note()}): torch emulates "
                          "bf16 matmuls there, often 100x slower than fp32; model.mixed_precision=fp32 is faster",
                          stacklevel=2)
        self.task_type = task_type
        self.wrapper: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._reference: nn.Module | None = None
        self.module = module.to(self.device)
        if gradient_checkpointing:
            if not getattr(module, "supports_gradient_checkpointing", False):
                raise R1KitError(f"model.gradient_checkpointing: {type(module).__name__} does not support it")
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = lora if lora is not None and lora.r > 0 else None
        self.peft = self._add_lora(self.lora, seed) if self.lora else None

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto", dtype: str = "float32",
             mixed_precision: str = "fp32", gradient_checkpointing: bool = False,
             lora: LoraConfig | None = None, seed: int = 0) -> Policy:
        """A causal LM from a local HF folder (or a LoRA adapter folder, merged) through r1kit.model.load_model,
        the one loading path; a bad folder is an R1KitError naming it."""
        from r1kit.model import load_model

        module, tokenizer = load_model(path, dtype)
        return cls(module, tokenizer, device=device, mixed_precision=mixed_precision,
                   gradient_checkpointing=gradient_checkpointing, lora=lora, seed=seed)

    @classmethod
    def from_config(cls, cfg, path: str | Path, *, lora: bool = True) -> Policy:
        """`Policy.load` with the run config's `model.*` settings and (unless lora=False) its `lora` section."""
        check_policy_options(cfg.model, cfg.lora)
        m = cfg.model
        return cls.load(path, device=m.device, dtype=m.dtype, mixed_precision=m.mixed_precision,
                        gradient_checkpointing=m.gradient_checkpointing, lora=cfg.lora if lora else None,
                        seed=cfg.seed)

    def _add_lora(self, lora: LoraConfig, seed: int):
        """Inject LoRA layers. Their initialisation is drawn from `seed` on a forked RNG, so it is the same on
        every run (resume re-creates it before loading the adapter) and leaves the global stream untouched."""
        from r1kit.model import lora_targets, untie_output_embeddings

        try:
            from peft import LoraConfig as PeftLoraConfig, get_peft_model
        except ImportError as e:
            raise R1KitError("lora.r > 0 needs peft: pip install 'r1kit[lora]'") from e
        targets = lora_targets(lora.target_modules)
        if "lm_head" in targets:  # its adapter must not leak into tied input embeddings when merged
            untie_output_embeddings(self.module)
        config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                                task_type=self.task_type, bias="none")
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                peft_model = get_peft_model(self.module, config)
        except ValueError as e:  # e.g. a target module name the model does not have
            raise R1KitError(f"lora.target_modules={list(lora.target_modules)}: {e}") from e
        self.module = peft_model.get_base_model()  # the same HF model, LoRA layers injected in place
        return peft_model

    # ---- what trainers use -----------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The module training forwards go through: the data-parallel wrapper when set, else `module`."""
        return self.wrapper if self.wrapper is not None else self.module

    def wrap(self, wrap_fn) -> nn.Module:
        """Install a data-parallel wrapper: `wrapper = wrap_fn(module)` (DDP, or FSDP2's fully_shard, which
        returns the module it shards in place). `module` stays the unwrapped model. Call it before
        `make_optimizer` (FSDP2 replaces parameters by sharded DTensors)."""
        if self.optimizer is not None:
            raise R1KitError("Policy.wrap must come before make_optimizer (the optimizer holds the parameters)")
        self.wrapper = wrap_fn(self.module)
        return self.wrapper

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def autocast(self):
        """bf16 autocast for a training forward when mixed precision is on, else a no-op context."""
        dtype = MIXED_PRECISION[self.mixed_precision]
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """{"trainable", "total"} parameter counts (tied weights counted once)."""
        params = list(self.module.parameters())
        return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}

    def make_optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.99)) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (the adapters only with LoRA); kept as `policy.optimizer`."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
        return self.optimizer

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], max_norm)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded sampling generator on the policy's device (the engine samples where the logits are)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def peak_memory_mb(self) -> float:
        """Peak memory so far: CUDA allocations on a GPU, else the process's peak resident set (MiB)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 2**10)

    # ---- the reference model ---------------------------------------------------------------------
    def keep_reference(self, ref: nn.Module | None = None) -> None:
        """Fix the KL reference: `ref` if given, nothing with LoRA (adapters off is the reference), else a
        frozen copy of the current weights."""
        if ref is not None:
            self._reference = ref.to(self.device).eval().requires_grad_(False)
        elif self.peft is None and self._reference is None:
            self._reference = copy.deepcopy(self.module).eval().requires_grad_(False)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference module to run no-grad forwards on: the policy with adapters disabled under LoRA."""
        if self._reference is not None:
            yield self._reference
        elif self.peft is not None:
            with self.peft.disable_adapter():
                yield self.module
        else:
            raise R1KitError("no reference model: call Policy.keep_reference() first (or use LoRA)")

    # ---- generation ------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a completion: the tokenizer's EOS and any the model's generation_config adds."""
        return self.eos_ids_of(self.module, self.tokenizer)

    @staticmethod
    def eos_ids_of(module: nn.Module, tokenizer) -> list[int]:
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        extra = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
        if not ids:
            raise R1KitError("the model's tokenizer has no EOS token: completions could never end")
        return sorted(ids)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    def make_engine(self, backend: str = "local", **options):
        """The engine over this policy's current weights (r1kit.engine.make_engine, the one place engines are
        built), with the model's own EOS ids. With LoRA the engine runs the adapted model through the HF
        forward (the fast path reads plain nn.Linear weights only); the reason is printed to stderr."""
        from r1kit.engine import make_engine

        engine = make_engine(self.module, self.tokenizer, backend=backend, eos_token_ids=self.eos_token_ids,
                             pad_token_id=self.pad_token_id, **options)
        reason = getattr(engine, "fallback_reason", None)
        if reason and backend == "local":
            print(f"r1kit: the engine samples {type(self.module).__name__} through the HF forward ({reason})",
                  file=sys.stderr)
        return engine

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the weights (the adapter only with LoRA) and the tokenizer into `folder` (the caller makes
        it atomic, e.g. r1kit.io.atomic_dir). `state_dict`: the full weights when the module is sharded
        (FSDP2: r1kit.dist.full_state_dict, gathered by every rank, written by rank 0)."""
        from r1kit.model import save_model, save_tokenizer

        folder = Path(folder)
        if self.peft is None:
            save_model(self.module, self.tokenizer, folder, state_dict=state_dict)
            return
        if state_dict is not None:  # the gathered weights of `module`, keyed as the PeftModel's own
            state_dict = {f"base_model.model.{k}": v for k, v in state_dict.items()}
        # the adapter only (an untied lm_head copy, see _add_lora, equals the base folder's embeddings)
        self.peft.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict,
                                  save_embedding_layers=False)
        save_tokenizer(self.tokenizer, folder)

    def load_weights(self, folder: str | Path) -> None:
        """Copy the weights saved by `save` (full, single or sharded safetensors; or an adapter) into the policy."""
        from r1kit.model import read_weights

        folder = Path(folder)
        if self.peft is not None:
            from peft import set_peft_model_state_dict

            if not (folder / "adapter_model.safetensors").exists():
                raise R1KitError(f"checkpoint {str(folder)!r} holds no LoRA adapter (adapter_model.safetensors), "
                                 "but lora.r > 0: it was written by a full fine-tuning run")
            weights = read_weights(folder, "adapter_model.safetensors")
            result = set_peft_model_state_dict(self.peft, weights)
            if getattr(result, "unexpected_keys", None):
                raise R1KitError(f"checkpoint {str(folder)!r}: adapter keys do not match ({result.unexpected_keys[:4]})")
            return
        weights = read_weights(folder)
        missing, unexpected = dist.load_full_state_dict(self.module, weights)  # FSDP2: each rank keeps its shard
        tied = getattr(self.module.config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k.startswith("lm_head"))]
        if unexpected or missing:
            raise R1KitError(f"checkpoint {str(folder)!r} does not match the model (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
        if tied:
            self.module.tie_weights()

    def export_merged(self, folder: str | Path) -> None:
        """A plain HF folder with the adapter merged into a copy of the weights (the policy is unchanged)."""
        from r1kit.model import save_model

        if self.peft is None:
            save_model(self.module, self.tokenizer, Path(folder))
            return
        merged = copy.deepcopy(self.peft).merge_and_unload()
        save_model(merged, self.tokenizer, Path(folder))

