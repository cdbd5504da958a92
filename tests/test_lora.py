"""LoRA through peft (lora.* config, r1kit.policy): adapters only train, the reference is the adapters-off
network, the engine samples the adapted weights, checkpoints hold the adapter, `r1kit export --merge` writes a
folder every verb loads, and LoRA GRPO / SFT / reward-model training learn."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

pytest.importorskip("peft")

from r1kit.config import LoraConfig, RewardModelConfig, RunConfig, SFTConfig, load_config  # noqa: E402
from r1kit.model import load_model, save_model, token_logprobs  # noqa: E402
from r1kit.policy import Policy  # noqa: E402
from r1kit.rewards import REWARD_FUNCS, register_reward  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.trainers.grpo import GRPOTrainer, micro_inputs  # noqa: E402
from r1kit.types import R1KitError  # noqa: E402
from tests.helpers import tiny_pair  # noqa: E402

LORA = LoraConfig(r=4, alpha=8.0)  # all linear layers but the output head (the default)
# With the output head as well: a random tiny model's frozen, tied embeddings leave LoRA on the other layers too
# little to work with in a few steps, so the learning tests adapt lm_head too (its embeddings get untied).
HEAD = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]
LEARN = LoraConfig(r=8, alpha=16.0, target_modules=HEAD)

if "test_lora_sevens" not in REWARD_FUNCS:
    @register_reward("test_lora_sevens")
    def sevens(completion: str, problem) -> float:
        """A trivial dense reward: the share of characters that are '7' (the arithmetic vocabulary has digits)."""
        return completion.count("7") / max(1, len(completion))


def _cfg(tmp_path, *overrides):
    base = ["log.progress=false", "log.tensorboard=false", "grpo.prompts_per_step=8", "grpo.group_size=8",
            "grpo.max_new_tokens=8", f"output_dir={tmp_path}", "name=t", "eval.every=0", "log.sample_every=0",
            "grpo.reward_weights={test_lora_sevens: 1.0}"]
    return load_config(RunConfig, None, base + list(overrides))


def _task():
    return make_task("arithmetic", min_digits=1, max_digits=1, num_test=5)


@pytest.fixture
def folder(tmp_path):
    """A tiny base model saved as an HF folder (a LoRA adapter names its base by this path)."""
    model, tok = tiny_pair(hidden=32, layers=2)
    save_model(model, tok, tmp_path / "base")
    return tmp_path / "base"


def _nonzero_adapters(policy: Policy, seed: int = 0) -> None:
    """peft starts B at zero (the adapted model equals the base); give the adapters weight for the checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_only_the_adapters_train_and_the_reference_is_the_base(folder):
    base, _ = load_model(folder)
    policy = Policy.load(folder, lora=LORA)
    counts = policy.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"] / 5
    assert all("lora_" in n for n, p in policy.module.named_parameters() if p.requires_grad)
    _nonzero_adapters(policy)
    ids = torch.randint(5, 200, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        adapted = token_logprobs(policy.module, ids, mask, 5)[0]
        with policy.reference() as ref:
            assert ref is policy.module  # no second copy in memory
            off = token_logprobs(ref, ids, mask, 5)[0]
        want = token_logprobs(base, ids, mask, 5)[0]
    torch.testing.assert_close(off, want, rtol=0, atol=1e-6)
    assert (adapted - want).abs().max() > 1e-3  # the adapters do change the model
    policy.keep_reference()
    assert policy._reference is None  # LoRA never copies the network


def test_engine_logprobs_equal_the_trainers_for_a_lora_model(folder):
    policy = Policy.load(folder, lora=LORA)
    _nonzero_adapters(policy)
    engine = policy.make_engine()
    assert engine.fallback_reason  # the adapted model runs through the HF forward, with the reason kept
    tok = policy.tokenizer
    prompts = [tok(f"User: {a}+{b}\nAssistant:").input_ids for a, b in [(1, 2), (3, 4), (5, 6)]]
    ro = engine.generate(prompts, group_size=4, max_new_tokens=12, temperature=1.0, generator=policy.generator(0))
    idx = torch.arange(ro.num_rows)
    ids, mask, tc = micro_inputs(ro, idx)
    with torch.no_grad():
        lp, _ = token_logprobs(policy.module, ids, mask, tc, 1.0)
    m = ro.completion_mask[:, :tc].bool()
    torch.testing.assert_close(lp[m], ro.logprobs[:, :tc][m], rtol=0, atol=1e-5)


def test_lora_grpo_raises_reward_and_logs_params_and_memory(tmp_path, folder):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "grpo.steps=25", "grpo.lr=1e-2", "log.save_every=0", "lora.r=8", "lora.alpha=16",
               f"lora.target_modules=[{', '.join(HEAD)}]")
    policy = Policy.from_config(cfg, folder)
    recs = GRPOTrainer(cfg, policy, _task(), cfg.run_dir).train()
    first = sum(r["reward"] for r in recs[:3]) / 3
    last = sum(r["reward"] for r in recs[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert recs[0]["params/trainable"] < recs[0]["params/total"] / 5
    assert recs[-1]["peak_memory_mb"] > 0


def test_lora_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, folder):
    torch.set_num_threads(1)
    opts = ["grpo.steps=4", "log.save_every=2", "grpo.lr=1e-2", "lora.r=4", "lora.alpha=8", "grpo.beta=0.05"]
    cfg_a = _cfg(tmp_path / "a", *opts)
    policy_a = Policy.from_config(cfg_a, folder)
    full = GRPOTrainer(cfg_a, policy_a, _task(), cfg_a.run_dir).train()
    ckpt = cfg_a.run_dir / "checkpoints" / "step-000004" / "model"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "adapter_model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size / 3

    cfg_b = _cfg(tmp_path / "b", *opts[1:], "grpo.steps=2")
    GRPOTrainer(cfg_b, Policy.from_config(cfg_b, folder), _task(), cfg_b.run_dir).train()
    cfg_c = _cfg(tmp_path / "b", *opts)
    policy_c = Policy.from_config(cfg_c, folder)
    resumed = GRPOTrainer(cfg_c, policy_c, _task(), cfg_c.run_dir).train(resume=True)
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "params/"))  # noqa: E731
                      and k not in ("tokens_per_s", "peak_memory_mb")}
    assert [keep(r) for r in resumed] == [keep(r) for r in full[2:]]
    for p, q in zip(policy_a.trainable_parameters(), policy_c.trainable_parameters()):
        assert torch.equal(p, q)
    assert full[-1]["kl"] > 0  # the adapters-off reference is used (beta > 0) and differs from the policy


def test_export_merge_writes_a_folder_every_verb_loads(tmp_path, folder, capsys):
    from r1kit.cli import main

    policy = Policy.load(folder, lora=LEARN)  # lm_head adapted: the merge must leave the input embeddings alone
    _nonzero_adapters(policy, seed=1)
    policy.save(tmp_path / "adapter")
    assert main(["export", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "x")]) == 2
    assert "--merge" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    model, _ = load_model(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        want = policy.module(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        # the adapter folder itself also loads (merged on the fly) wherever a model path is accepted
        torch.testing.assert_close(load_model(tmp_path / "adapter")[0](input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["generate", "--model", str(merged), "--prompt", "1+2", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == "1+2"
    assert main(["eval", "--model", str(merged), "--benchmark", "arithmetic", "--limit", "2", "--k", "1",
                 "--max-new-tokens", "4", "--quiet"]) == 0


def test_lora_sft_learns_and_saves_the_adapter(tmp_path, folder):
    from r1kit.trainers.sft import encode_record, train_sft

    torch.set_num_threads(1)
    policy = Policy.load(folder, lora=LEARN)
    examples = [encode_record({"prompt": f"User: {a}+{a}\nAssistant:", "completion": f" <answer> {2 * a} </answer>"},
                              policy.tokenizer) for a in range(10)]
    cfg = SFTConfig(epochs=30, seq_len=64, micro_batch_size=4, lr=3e-2, warmup_steps=2, save_every=1000)
    summary = train_sft(policy, examples, cfg, tmp_path / "sft", seed=0)
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["params"]["trainable"] < summary["params"]["total"] / 5
    assert (tmp_path / "sft" / "model" / "adapter_model.safetensors").exists()
    model, _ = load_model(tmp_path / "sft" / "model")  # the adapter folder loads merged
    ids = torch.tensor([examples[0].ids])
    base, _ = load_model(folder)
    torch.testing.assert_close(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, policy.module(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_reward_model_trains_and_its_merged_folder_scores(tmp_path, folder):
    from r1kit.rewards.reward_model import RewardModelScorer
    from r1kit.trainers.reward_model import PreferencePair, build_reward_model, train_reward_model

    torch.set_num_threads(1)
    tok = tiny_pair()[1]
    rng = random.Random(0)
    pairs = []
    for _ in range(48):
        x = rng.randint(10, 99)
        pairs.append(PreferencePair(f"User: repeat {x}\nAssistant:", f" <answer> {x} </answer>", f" {x} {x} {x}"))
    policy = Policy(build_reward_model(folder, tok), tok, lora=LoraConfig(r=8, alpha=16.0), task_type="SEQ_CLS")
    cfg = RewardModelConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=2, val_frac=0.25)
    summary = train_reward_model(policy, pairs, cfg, tmp_path / "rm", seed=0)
    assert summary["val_after"]["accuracy"] >= 0.9 and summary["params"]["trainable"] < summary["params"]["total"] / 3
    scorer = RewardModelScorer(tmp_path / "rm" / "model", normalize="none")
    p = pairs[0]
    with torch.no_grad():
        from r1kit.rewards.reward_model import rewards_of

        want = rewards_of(policy.module, tok, [p.prompt], [p.chosen])
    assert scorer.score([p.prompt], [p.chosen])[0] == pytest.approx(float(want[0]), abs=1e-4)


def test_bad_target_modules_name_the_field(folder):
    with pytest.raises(R1KitError, match="lora.target_modules"):
        Policy.load(folder, lora=LoraConfig(r=4, target_modules=["no_such_proj"]))


def test_a_full_checkpoint_is_refused_by_a_lora_policy(tmp_path, folder):
    policy = Policy.load(folder, lora=LORA)
    with pytest.raises(R1KitError, match="holds no LoRA adapter"):
        policy.load_weights(folder)
    copy.deepcopy(policy)  # a LoRA policy stays copyable (export_merged relies on it)


def test_lora_settings_are_part_of_a_training_stages_identity():
    """The R1 pipeline reuses a finished stage only when its identity matches: LoRA changes the training stages'
    identity (never the pretraining one), and r = 0 leaves every identity as it was."""
    from dataclasses import replace

    from r1kit.recipes import r1

    cfg = load_config(RunConfig, None, [])
    lora = replace(cfg, lora=LoraConfig(r=8))
    off = replace(cfg, lora=LoraConfig(r=0, alpha=99.0))  # settings of an inactive LoRA are not hashed

    def ident(c, name):
        stage = r1.STAGES[name]
        return r1.stage_identity(c, stage, {p: {"identity": "x"} for p in stage.parents}, {})[1]

    for name in ("zero", "cold_sft", "reason_rl", "rm", "distill"):
        assert ident(lora, name) != ident(cfg, name) and ident(off, name) == ident(cfg, name), name
    assert ident(lora, "base") == ident(cfg, "base")
