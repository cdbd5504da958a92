"""Checkpoints: an HF model folder plus optimizer, RNG and step state, written atomically.

Layout: <run>/checkpoints/step-000050/{model/, trainer_state.pt, config.yaml}; model/ is an HF folder, or
only the LoRA adapter (adapter_model.safetensors + adapter_config.json) for a LoRA run. A checkpoint folder is
built under a temporary name and renamed into place, so a crash never leaves half of one; the
newest complete one is what `--resume` picks up.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from r1kit.io import atomic_dir
from r1kit.types import R1KitError


def rng_state(py_rng: random.Random, generator: torch.Generator) -> dict[str, Any]:
    state = {"python": py_rng.getstate(), "torch": torch.get_rng_state(), "sampler": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], py_rng: random.Random, generator: torch.Generator) -> None:
    py_rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, policy, trainer_state: dict[str, Any],
                    config_yaml: str, keep: int = 2, state_dict: dict[str, Any] | None = None) -> Path:
    """Write <ckpt_root>/step-N/{model/, trainer_state.pt, config.yaml} atomically; `policy.save` decides
    what model/ holds (the full HF folder, or the adapter only with LoRA). Keeps the newest `keep`."""
    path = Path(ckpt_root) / f"step-{step:06d}"
    with atomic_dir(path) as tmp:
        policy.save(tmp / "model", state_dict=state_dict)  # state_dict: full weights gathered from FSDP2 shards
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "trainer_state.pt").exists() and (p / "model").is_dir()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    f = Path(path) / "trainer_state.pt"
    try:
        return torch.load(f, weights_only=False)
    except Exception as e:  # a corrupt file must name itself
        raise R1KitError(f"checkpoint {str(f)!r} cannot be read ({e}); delete it to resume from an earlier one") from e
