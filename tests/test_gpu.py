"""On a GPU (marked `gpu`; skipped with the reason where CUDA is absent, see conftest.py): the GRPO learning test,
the engine's logprob check, LoRA and bf16 mixed precision on CUDA, and DDP over NCCL on two GPUs equal to one.

Run them with `python -m pytest -m gpu` on a machine with a GPU (benchmarks/bench_gpu.py times a GRPO step there)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1kit.config import LoraConfig, RunConfig, load_config
from r1kit.model import token_logprobs
from r1kit.policy import Policy
from r1kit.rewards import REWARD_FUNCS, register_reward
from r1kit.tasks import make_task
from r1kit.trainers.grpo import GRPOTrainer, micro_inputs
from tests.helpers import tiny_pair

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]

if "test_gpu_sevens" not in REWARD_FUNCS:
    @register_reward("test_gpu_sevens")
    def sevens(completion: str, problem) -> float:
        """A trivial dense reward: the share of characters that are '7'."""
        return completion.count("7") / max(1, len(completion))


def _cfg(tmp_path, *overrides):
    base = ["log.progress=false", "log.tensorboard=false", "grpo.prompts_per_step=8", "grpo.group_size=8",
            "grpo.max_new_tokens=8", f"output_dir={tmp_path}", "name=t", "eval.every=0", "log.sample_every=0",
            "log.save_every=0", "grpo.reward_weights={test_gpu_sevens: 1.0}", "model.device=cuda"]
    return load_config(RunConfig, None, base + list(overrides))


def _learns(recs) -> tuple[float, float]:
    return sum(r["reward"] for r in recs[:3]) / 3, sum(r["reward"] for r in recs[-3:]) / 3


@pytest.mark.parametrize("mixed_precision", ["fp32", "bf16"])
def test_grpo_raises_reward_on_cuda(tmp_path, mixed_precision):
    model, tok = tiny_pair()
    cfg = _cfg(tmp_path, "grpo.steps=25", "grpo.lr=1e-2", f"model.mixed_precision={mixed_precision}")
    policy = Policy(model, tok, device="cuda", mixed_precision=mixed_precision)
    trainer = GRPOTrainer(cfg, policy, make_task("arithmetic", min_digits=1, max_digits=1, num_test=5), cfg.run_dir)
    recs = trainer.train()
    first, last = _learns(recs)
    assert last > first + 0.15, (first, last)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in policy.module.parameters())
    assert recs[-1]["peak_memory_mb"] > 0


def test_lora_grpo_raises_reward_on_cuda(tmp_path):
    model, tok = tiny_pair(layers=2)
    cfg = _cfg(tmp_path, "grpo.steps=25", "grpo.lr=1e-2", "grpo.beta=0.02")
    lora = LoraConfig(r=8, alpha=16.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])
    policy = Policy(model, tok, device="cuda", lora=lora)
    recs = GRPOTrainer(cfg, policy, make_task("arithmetic", min_digits=1, max_digits=1, num_test=5), cfg.run_dir).train()
    first, last = _learns(recs)
    assert last > first + 0.1, (first, last)


@pytest.mark.parametrize("fast_path", [None, False])
def test_engine_logprobs_equal_the_trainers_on_cuda(fast_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = tiny_pair(hidden=64, layers=2)
    policy = Policy(model, tok, device="cuda")
    engine = policy.make_engine(**({} if fast_path is None else {"fast_path": fast_path}))
    assert (engine.fallback_reason is None) == (fast_path is None)
    prompts = [tok(f"User: {a}+{b}\nAssistant:").input_ids for a, b in [(1, 2), (13, 4), (5, 66)]]
    ro = engine.generate(prompts, group_size=4, max_new_tokens=16, temperature=1.0, generator=policy.generator(0))
    assert ro.logprobs.is_cuda
    ids, mask, tc = micro_inputs(ro, torch.arange(ro.num_rows, device="cuda"))
    with torch.no_grad():
        lp, _ = token_logprobs(policy.module, ids, mask, tc, 1.0)
    m = ro.completion_mask[:, :tc].bool()
    torch.testing.assert_close(lp[m], ro.logprobs[:, :tc][m], rtol=0, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs 2 GPUs")
def test_ddp_over_nccl_trains_what_one_gpu_trains(tmp_path):
    from tests import gpu_scenarios

    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1KIT_DIST_TIMEOUT": "120", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "gpu_scenarios.py"), str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "two" / "grpo_nccl.pt")
    one = gpu_scenarios.run_grpo_cuda(tmp_path / "one")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-4
