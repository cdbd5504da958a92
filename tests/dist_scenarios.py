"""Training runs that tests/test_dist.py runs twice: in the test process (one process) and under
`torchrun --nproc-per-node 2 tests/dist_scenarios.py OUT_DIR NAME...` (gloo, 2 ranks), where rank 0
saves each run's final parameters to OUT_DIR/NAME.pt. A scenario named "crash" fails on rank 1 while
rank 0 waits in a collective: the job must end, naming the rank.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(ROOT))

from r1kit import dist  # noqa: E402
from r1kit.config import RunConfig, SFTConfig, load_config  # noqa: E402
from r1kit.corpus import build_corpus  # noqa: E402
from r1kit.policy import Policy  # noqa: E402
from r1kit.rewards import REWARD_FUNCS, register_reward  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from tests.helpers import tiny_pair  # noqa: E402

if "test_sevens" not in REWARD_FUNCS:
    @register_reward("test_sevens")
    def sevens(completion: str, problem) -> float:
        """A dense reward: the share of characters that are '7' (random models get a spread of it)."""
        return completion.count("7") / max(1, len(completion))


def _policy(strategy: str) -> Policy:
    model, tok = tiny_pair(layers=2, seed=0)
    policy = Policy(model.train(), tok, device="cpu")
    policy.wrap(lambda m: dist.wrap(m, strategy))
    return policy


def grpo_cfg(out: Path, strategy: str, *extra: str) -> RunConfig:
    return load_config(RunConfig, None, [
        "log.progress=false", "log.tensorboard=false", "log.sample_every=0", "log.save_every=0", "eval.every=0",
        "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=8",
        "grpo.micro_batch_size=4", "grpo.lr=1e-3", "grpo.reward_weights={test_sevens: 1.0}",
        "grpo.rollout_seeds=group", f"dist.strategy={strategy}", f"output_dir={out}", "name=grpo", *extra])


def run_grpo(out: Path, strategy: str, *extra: str, resume: bool = False) -> dict[str, torch.Tensor]:
    from r1kit.trainers.grpo import GRPOTrainer

    cfg = grpo_cfg(out, strategy, *extra)
    policy = _policy(strategy)
    task = make_task("arithmetic", min_digits=1, max_digits=2, num_test=5)
    GRPOTrainer(cfg, policy, task, cfg.run_dir).train(resume=resume)
    return dist.full_state_dict(policy.module)


def sft_examples(n: int = 48):
    from r1kit.trainers.sft import encode_record

    _, tok = tiny_pair(layers=2, seed=0)
    task = make_task("arithmetic", min_digits=1, max_digits=2, num_test=5)
    docs = build_corpus(task, n, 0.5, 0.2, "r1_zero", random.Random(1))
    return [encode_record({"prompt": d.prompt, "completion": d.completion}, tok, f"doc {i}") for i, d in enumerate(docs)]


def run_sft(out: Path, strategy: str) -> dict[str, torch.Tensor]:
    from r1kit.trainers.sft import train_sft

    cfg = SFTConfig(seq_len=128, micro_batch_size=2, grad_accum=3, max_steps=3, lr=1e-3, warmup_steps=1, save_every=100)
    policy = _policy(strategy)
    train_sft(policy, sft_examples(), cfg, out / f"sft-{strategy}", seed=0)
    return dist.full_state_dict(policy.module)


def rm_model():
    from r1kit.config import ModelConfig
    from r1kit.trainers.reward_model import build_reward_model

    _, tok = tiny_pair(layers=2, seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=256)
    return build_reward_model(None, tok, cfg), tok


def run_rm(out: Path) -> dict[str, torch.Tensor]:
    """3 steps of 5 pairs (shares 3 + 2 on 2 ranks), Bradley-Terry loss; DDP as the trainer sets it up."""
    from r1kit.config import RewardModelConfig
    from r1kit.trainers.reward_model import PreferencePair, train_reward_model

    model, tok = rm_model()
    pairs = [PreferencePair(f"{a}+{b}=", f" {a + b}", f" {a + b + 1}") for a in range(3) for b in range(5)]
    cfg = RewardModelConfig(epochs=1, batch_size=5, lr=1e-3, warmup_steps=1, val_frac=0.0)
    train_reward_model(Policy(model, tok, device="cpu", task_type="SEQ_CLS"), pairs, cfg, out / "rm", seed=0)
    return dist.full_state_dict(model)


def run_pretrain(out: Path) -> dict[str, torch.Tensor]:
    """3 steps of 6 documents (3 per rank), DDP as the trainer sets it up."""
    from r1kit.config import PretrainConfig
    from r1kit.trainers.pretrain import pretrain

    model, tok = tiny_pair(layers=2, seed=0)
    task = make_task("arithmetic", min_digits=1, max_digits=2, num_test=5)
    docs = build_corpus(task, 60, 0.5, 0.2, "r1_zero", random.Random(2))
    cfg = PretrainConfig(steps=3, batch_size=6, lr=1e-3, warmup_steps=1, gate_pass1=0.0, max_steps=3)
    pretrain(Policy(model.train(), tok, device="cpu"), docs, cfg, seed=0, show_progress=False)
    return dist.full_state_dict(model)


def stage0_cfg(out: Path) -> RunConfig:
    """The real stage-0 path at toy size: a corpus, a tokenizer and a model built from the config, the
    readiness gate sampling on rank 0 between cycles (never passed: 1.0), two warm-restart cycles."""
    return load_config(RunConfig, None, [
        f"output_dir={out}", "name=stage0", "threads=1", "task.options={min_digits: 1, max_digits: 1, num_test: 10}",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
        "model.intermediate_size=64", "model.vocab_size=300", "pretrain.corpus_docs=200", "pretrain.steps=6",
        "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.gate_pass1=1.0", "pretrain.gate_action=extend",
        "pretrain.extend_steps=3", "pretrain.max_steps=12", "pretrain.gate_problems=4", "grpo.max_new_tokens=16"])


def run_stage0(out: Path) -> dict[str, torch.Tensor]:
    """`ensure_base_model` as `r1kit zero` calls it; the base folder is out/stage0/base (rank 0 writes it)."""
    import warnings

    from r1kit.recipes.zero import ensure_base_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gate's "did not reach" warning: expected here
        base = ensure_base_model(stage0_cfg(out), show_progress=False)
    from safetensors.torch import load_file

    return load_file(base / "model.safetensors") if dist.is_main() else {}


def crash() -> None:
    """Rank 1 raises; rank 0 blocks in a collective that rank 1 never joins."""
    if dist.rank() == 1:
        raise RuntimeError("forced failure for the crash test")
    dist.barrier()
    dist.barrier()


SCENARIOS = {
    "grpo_ddp": lambda out: run_grpo(out / "grpo_ddp", "ddp"),
    "grpo_fsdp2": lambda out: run_grpo(out / "grpo_fsdp2", "fsdp2"),
    "sft_ddp": lambda out: run_sft(out, "ddp"),
    "sft_fsdp2": lambda out: run_sft(out, "fsdp2"),
    "rm_ddp": run_rm,
    "pretrain_ddp": run_pretrain,
    "stage0": run_stage0,
    # 2 ranks train 2 steps and checkpoint; the test resumes the 3rd step in one process
    "grpo_ckpt": lambda out: run_grpo(out / "grpo_ckpt", "ddp", "grpo.steps=2", "log.save_every=2"),
}


def main(out_dir: str, names: list[str]) -> int:
    out = Path(out_dir)
    torch.set_num_threads(1)
    for name in names:
        if name == "crash":
            crash()
            continue
        params = SCENARIOS[name](out)
        if dist.is_main():
            torch.save(params, out / f"{name}.pt")
        dist.barrier()
    return 0


if __name__ == "__main__":
    dist.init_from_env()
    sys.exit(dist.run_main(lambda: main(sys.argv[1], sys.argv[2:])))
