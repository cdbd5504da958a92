"""`torchrun --nproc-per-node 2 tests/gpu_scenarios.py OUT_DIR`: GRPO with DDP over NCCL, one GPU per rank
(tests/test_gpu.py compares it with one process on one GPU). The run is tests/dist_scenarios.py's GRPO scenario
with the policy on cuda:LOCAL_RANK."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from r1kit import dist
from r1kit.policy import Policy
from r1kit.tasks import make_task
from tests import dist_scenarios as sc
from tests.helpers import tiny_pair


def run_grpo_cuda(out: Path) -> dict[str, torch.Tensor]:
    """GRPO, 3 steps, the policy on this rank's GPU (DDP under torchrun, plain in one process)."""
    from r1kit.trainers.grpo import GRPOTrainer

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity, not TF32's 10-bit mantissa
    torch.backends.cudnn.allow_tf32 = False
    cfg = sc.grpo_cfg(out, "ddp")
    model, tok = tiny_pair(layers=2, seed=0)
    policy = Policy(model.train(), tok, device=f"cuda:{dist.local_rank()}")
    policy.wrap(lambda m: dist.wrap(m, "ddp"))
    GRPOTrainer(cfg, policy, make_task("arithmetic", min_digits=1, max_digits=2, num_test=5), cfg.run_dir).train()
    return {k: v.detach().cpu() for k, v in dist.full_state_dict(policy.module).items()}


def main(out_dir: str) -> int:
    params = run_grpo_cuda(Path(out_dir))
    if dist.is_main():
        torch.save(params, Path(out_dir) / "grpo_nccl.pt")
    dist.barrier()
    return 0


if __name__ == "__main__":
    dist.init_from_env()
    sys.exit(dist.run_main(lambda: main(sys.argv[1])))
