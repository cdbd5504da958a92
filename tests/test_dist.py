"""Data parallel (r1kit.dist): 2 gloo ranks under torchrun train exactly what one process trains.

One torchrun job (tests/dist_scenarios.py) runs every 2-rank scenario; the test process runs the same
scenarios in one process and compares parameters after 3 optimizer steps (float32, <= 1e-5):
GRPO and SFT, DDP and FSDP2, plus a 2-rank checkpoint resumed in one process, and a crash on rank 1.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1kit import dist
from r1kit.io import read_jsonl
from r1kit.types import R1KitError
from tests import dist_scenarios as sc
from tests.helpers import tiny_pair

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _torchrun(out: Path, *names: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1KIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "dist_scenarios.py"),
           str(out), *names]
    # its own session: on a timeout the workers are killed with the launcher (not left running as orphans)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run every 2-rank scenario once; returns the folder holding NAME.pt per scenario."""
    out = tmp_path_factory.mktemp("dist")
    proc = _torchrun(out, *sc.SCENARIOS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _moved(after: dict[str, torch.Tensor]) -> float:
    """How far training moved the parameters from their initialisation (a parity of no-ops proves nothing)."""
    before = tiny_pair(layers=2, seed=0)[0].state_dict()
    return max(float((after[k] - before[k]).abs().max()) for k in after)


def _metrics(path: Path) -> list[dict]:
    skip = ("time", "tokens_per_s", "peak_memory_mb")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in read_jsonl(path)]


@pytest.mark.parametrize("algo", ["grpo", "sft"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_train_what_one_process_trains(two_ranks, tmp_path, algo, strategy):
    torch.set_num_threads(1)
    one = sc.run_grpo(tmp_path, strategy) if algo == "grpo" else sc.run_sft(tmp_path, strategy)
    two = torch.load(two_ranks / f"{algo}_{strategy}.pt")
    assert _moved(one) > 1e-3
    assert _max_diff(one, two) <= TOL
    # rank 0 logged the GLOBAL batch's metrics: rewards of every rank's groups, the loss, and the grad norm
    # of the gradient SUMMED over ranks (an average would halve it; Adam alone would hide that)
    run = "grpo" if algo == "grpo" else f"sft-{strategy}"  # the run folder under each output folder
    m1 = _metrics(tmp_path / run / "metrics.jsonl")
    m2 = _metrics(two_ranks / (f"grpo_{strategy}" if algo == "grpo" else "") / run / "metrics.jsonl")
    assert [r["step"] for r in m2] == [1, 2, 3] and m1[0].keys() == m2[0].keys()
    for r1, r2 in zip(m1, m2):
        for k, v in r1.items():
            assert r2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (r1["step"], k)


@pytest.mark.parametrize("name", ["rm", "pretrain"])
def test_the_reward_model_and_pretraining_train_alike_on_two_ranks(two_ranks, tmp_path, name):
    torch.set_num_threads(1)
    one = sc.run_rm(tmp_path) if name == "rm" else sc.run_pretrain(tmp_path)
    before = (sc.rm_model()[0] if name == "rm" else tiny_pair(layers=2, seed=0)[0]).state_dict()
    assert max(float((one[k] - before[k]).abs().max()) for k in one) > 1e-3
    assert _max_diff(one, torch.load(two_ranks / f"{name}_ddp.pt")) <= TOL


def test_stage0_with_its_readiness_gate_trains_the_same_base_on_two_ranks(two_ranks, tmp_path):
    """The path `r1kit zero` takes (ensure_base_model): corpus, tokenizer and model from the config, batches
    shared by document, the gate sampled on rank 0 between cosine cycles and broadcast, warm restarts."""
    import json

    torch.set_num_threads(1)
    one = sc.run_stage0(tmp_path)
    info1 = json.loads((tmp_path / "stage0" / "base" / "pretrain.json").read_text())
    info2 = json.loads((two_ranks / "stage0" / "base" / "pretrain.json").read_text())
    assert _max_diff(one, torch.load(two_ranks / "stage0.pt")) <= TOL
    assert [c["step"] for c in info2["gate"]["checks"]] == [6, 9, 12]  # two cycles after the first check
    for key in ("gate_pass1", "passed", "step"):
        assert [c[key] for c in info2["gate"]["checks"]] == [c[key] for c in info1["gate"]["checks"]]
    losses = [[r["loss"] for r in i["log"] if "loss" in r] for i in (info1, info2)]
    assert len(losses[0]) > 2 and losses[0][-1] < losses[0][0]  # it trained
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert info2["total_steps"] == info1["total_steps"] == 12


def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    torch.set_num_threads(1)
    reference = sc.run_grpo(tmp_path / "ref", "ddp")
    shutil.copytree(two_ranks / "grpo_ckpt" / "grpo", tmp_path / "grpo")
    resumed = sc.run_grpo(tmp_path, "ddp", resume=True)
    assert _max_diff(reference, resumed) <= TOL


def test_a_crash_on_one_rank_ends_the_job_naming_it(tmp_path):
    t0 = time.time()
    proc = _torchrun(tmp_path, "crash", timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 90
    assert "r1kit: rank 1 failed: RuntimeError: forced failure" in proc.stderr


def test_shares_are_disjoint_and_cover_the_batch():
    got = [list(range(12))[dist.share(12, "grpo.prompts_per_step", world_size=3, rank_=r)] for r in range(3)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(R1KitError, match="grpo.prompts_per_step=10 must be divisible by the number of ranks"):
        dist.share(10, "grpo.prompts_per_step", world_size=4, rank_=0)


def test_stream_seeds_depend_on_the_stream_only():
    a = dist.stream_seed(0, "group", 3, 5)
    assert a == dist.stream_seed(0, "group", 3, 5)
    assert len({a, dist.stream_seed(0, "group", 3, 6), dist.stream_seed(0, "group", 4, 5), dist.stream_seed(1, "group", 3, 5)}) == 4
    assert 0 <= a < 2**63


def test_one_process_helpers_are_no_ops():
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    assert dist.reduce_metrics({"a": 1.0, "b_max": 2.0}, weight=3) == {"a": 1.0, "b_max": 2.0}
    assert float(dist.all_reduce_sum(2.5)) == 2.5
    m = torch.nn.Linear(2, 2)
    assert dist.wrap(m, "fsdp2") is m
    with pytest.raises(R1KitError, match="dist.strategy='zero3' is unknown"):
        dist.wrap(m, "zero3")


def test_a_groups_samples_do_not_depend_on_the_other_groups_in_the_batch():
    """What makes N ranks sample what one process samples (grpo.rollout_seeds=group)."""
    from r1kit.engine import make_engine
    from r1kit.trainers.grpo_batch import generate_groups

    model, tok = tiny_pair(layers=2, seed=0)
    engine = make_engine(model, tok)
    prompts = [tok(q).input_ids for q in ("1+2=", "34+5=", "7+8=", "60+61=")]
    seeds = [dist.stream_seed(0, "group", 0, 0, i) for i in range(4)]

    def run(ps, ss):
        return generate_groups(engine, ps, ss, lambda s: torch.Generator().manual_seed(s), group_size=3,
                               max_new_tokens=8, temperature=1.0, top_p=1.0, pad_id=tok.pad_token_id)

    whole, half = run(prompts, seeds), run(prompts[2:], seeds[2:])
    assert len({tuple(r) for r in whole.completion_ids.tolist()}) > 3  # the samples differ from each other
    tc = half.completion_ids.shape[1]
    assert torch.equal(whole.completion_ids[6:, :tc], half.completion_ids)
    assert torch.equal(whole.completion_mask[6:, :tc], half.completion_mask)
    assert torch.allclose(whole.logprobs[6:, :tc], half.logprobs, atol=1e-5)
    assert torch.equal(whole.truncated[6:], half.truncated)
