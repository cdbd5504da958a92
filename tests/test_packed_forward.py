"""The packed, shared-prefix GRPO forward (r1kit/trainers/packed_forward.py) against the padded one.

References are the padded HF forward (`micro_inputs` + `token_logprobs`) and `policy_objective` on its
logprobs: in float64 the packed logprobs and the objective's gradient w.r.t. every parameter match to
1e-10; in float32 to 1e-5. Ragged prompts and completions, empty completions, GQA, qwen2 biases, tied and
untied heads, a micro-batch cutting a group in two, temperature and entropy all appear below.
"""
from __future__ import annotations

import pytest
import torch

from r1kit.algorithms import agg_denominator, policy_objective
from r1kit.model import token_logprobs
from r1kit.trainers.grpo import micro_inputs
from r1kit.trainers.packed_forward import (
    completion_logprobs,
    pack_rows,
    packed_problem,
    packed_token_logprobs,
)
from r1kit.types import R1KitError, Rollout

VOCAB, PAD = 61, 0


@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """HF's RMSNorm computes in float32 whatever the model's dtype, so a float64 model is float64 only up to
    ~1e-8 there: summing G rows' gradients before the norm (packed) or after (padded) then differs at that
    level. Both forwards call the same norm modules; for these tests they compute in the input's dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    def forward(self, x):
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    for cls in (LlamaRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


def make_model(arch="llama", kv_heads=2, tied=True, dtype=torch.float64, seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=kv_heads, intermediate_size=48, max_position_embeddings=128,
                  tie_word_embeddings=tied, pad_token_id=PAD, bos_token_id=None, eos_token_id=1)
    cls, config = (LlamaForCausalLM, LlamaConfig) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    model = cls(config(**common)).to(dtype)
    with torch.no_grad():  # non-trivial norm weights and biases, so that a missed parameter shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_rollout(prompt_lens, comp_lens, G, seed=1, Tp=None, Tc=None) -> Rollout:
    """P prompts (left-padded to Tp) x G completions (right-padded to Tc) of random tokens."""
    g = torch.Generator().manual_seed(seed)
    P, N = len(prompt_lens), len(comp_lens)
    assert N == P * G
    Tp, Tc = Tp or max(prompt_lens), Tc or max(max(comp_lens), 1)
    prompt_ids, prompt_mask = torch.full((N, Tp), PAD), torch.zeros(N, Tp, dtype=torch.long)
    for p, n in enumerate(prompt_lens):
        toks = torch.randint(2, VOCAB, (n,), generator=g)
        prompt_ids[p * G:(p + 1) * G, Tp - n:] = toks
        prompt_mask[p * G:(p + 1) * G, Tp - n:] = 1
    comp_ids, comp_mask = torch.full((N, Tc), PAD), torch.zeros(N, Tc)
    for r, n in enumerate(comp_lens):
        comp_ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        comp_mask[r, :n] = 1
    return Rollout(prompt_ids, prompt_mask, comp_ids, comp_mask, torch.zeros(N, Tc), torch.zeros(N, dtype=torch.bool), G)


def padded(model, ro, idx, **kw):
    ids, mask, tc = micro_inputs(ro, idx)
    return (*token_logprobs(model, ids, mask, tc, **kw), tc)


def packed(model, ro, idx, **kw):
    lay = pack_rows(ro, idx)
    return (*packed_token_logprobs(model, lay, **kw), lay.width)


def objective_grads(model, ro, idx, forward, beta=0.0, entropy_coef=0.0, temperature=1.0):
    """Gradients of the GRPO objective (clipped ratio, KL, entropy bonus) on rows idx."""
    model.zero_grad(set_to_none=True)
    lp, ent, tc = forward(model, ro, idx, temperature=temperature, with_entropy=True)
    mask = ro.completion_mask[idx, :tc].to(lp.dtype)
    g = torch.Generator().manual_seed(5)
    noise = lambda: 0.3 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)  # noqa: E731
    old, ref = lp.detach() + noise(), lp.detach() + noise()
    adv = torch.randn(idx.numel(), generator=g, dtype=lp.dtype)
    loss, _ = policy_objective(lp, old, adv, mask, ref_logprobs=ref, beta=beta, entropy=ent,
                               entropy_coef=entropy_coef, denominator=agg_denominator(mask, "seq-mean-token-mean"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, ro, idx, tol, **kw):
    lp_a, ent_a, tc_a = padded(model, ro, idx, with_entropy=True, **kw)
    lp_b, ent_b, tc_b = packed(model, ro, idx, with_entropy=True, **kw)
    valid = ro.completion_mask[idx, :tc_a] > 0
    assert tc_a == tc_b and lp_b.shape == lp_a.shape
    assert (lp_b[~valid] == 0).all() and (ent_b[~valid] == 0).all()
    assert (lp_a - lp_b)[valid].abs().max() <= tol
    assert (ent_a - ent_b)[valid].abs().max() <= tol


CASES = {
    # name: (model kwargs, prompt lengths, completion lengths per row, group size)
    "llama_gqa_tied": (dict(kv_heads=2), [5, 9, 3], [4, 7, 1, 6, 2, 9, 5, 5, 3], 3),
    "llama_mha_untied": (dict(kv_heads=4, tied=False), [6, 2], [3, 8, 5, 1, 4, 2, 7, 6], 4),
    "qwen2_biases_gqa": (dict(arch="qwen2", kv_heads=1), [4, 8], [2, 6, 5, 9, 3, 1], 3),
    "all_empty_but_one": (dict(), [7, 3], [0, 0, 0, 5, 2, 0, 4, 1], 4),
    # short and long rows: attention runs in two segments (see test_rows_of_very_different_lengths_...)
    "two_segments": (dict(kv_heads=2), [5, 3], [2, 1, 0, 90, 3, 88, 2, 2], 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_logprobs_and_gradients_equal_the_padded_forward(case):
    kwargs, plens, clens, G = CASES[case]
    model = make_model(**kwargs).train()
    ro = make_rollout(plens, clens, G)
    idx = torch.arange(ro.num_rows)
    assert packed_problem(model) is None
    assert_same(model, ro, idx, 1e-10, temperature=0.7)
    loss_a, grads_a = objective_grads(model, ro, idx, padded, beta=0.04, entropy_coef=0.01, temperature=0.7)
    loss_b, grads_b = objective_grads(model, ro, idx, packed, beta=0.04, entropy_coef=0.01, temperature=0.7)
    assert abs(loss_a - loss_b) <= 1e-10
    assert grads_a.keys() == grads_b.keys() == {n for n, _ in model.named_parameters()}
    for name, ga in grads_a.items():
        assert ga.abs().max() > 0, name  # every parameter takes part
        assert (ga - grads_b[name]).abs().max() <= 1e-10, name


def test_micro_batches_that_cut_groups_and_sum_to_the_full_gradient():
    """Rows 2..6 of G=4 groups (a partial group at each end), and the sum of micro-batch gradients
    (the trainer's accumulation) equals the one-batch padded gradient."""
    model = make_model(kv_heads=2)
    ro = make_rollout([5, 9, 4], [4, 7, 0, 6, 2, 9, 5, 5, 3, 1, 8, 2], 4)
    assert_same(model, ro, torch.arange(2, 7), 1e-10)
    full = torch.arange(ro.num_rows)
    mask = ro.completion_mask
    denom = agg_denominator(mask, "token-mean")
    adv = torch.linspace(-1, 1, ro.num_rows, dtype=torch.float64)

    def loss_of(forward, idx):
        lp, _, tc = forward(model, ro, idx)
        m = mask[idx, :tc].double()
        return policy_objective(lp, lp.detach(), adv[idx], m, agg_mode="token-mean", denominator=denom)[0]

    model.zero_grad(set_to_none=True)
    loss_of(padded, full).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for idx in (torch.arange(0, 5), torch.arange(5, 12)):
        loss_of(packed, idx).backward()
    for n, p in model.named_parameters():
        assert (p.grad - want[n]).abs().max() <= 1e-10, n


def test_float32_agreement():
    model = make_model(kv_heads=2, dtype=torch.float32, layers=3)
    ro = make_rollout([12, 20, 7, 15], [30, 2, 17, 25, 0, 9, 31, 14], 2)
    assert_same(model, ro, torch.arange(ro.num_rows), 1e-5)
    _, ga = objective_grads(model, ro, torch.arange(ro.num_rows), padded)
    _, gb = objective_grads(model, ro, torch.arange(ro.num_rows), packed)
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= 1e-5 * max(1.0, float(ga[n].abs().max())), n


def test_layout_shares_each_prompt_once_and_skips_padding():
    ro = make_rollout([5, 3], [4, 0, 2, 6, 1, 3], 3, Tp=8, Tc=10)
    lay = pack_rows(ro, torch.arange(6))
    assert lay.num_units == 2 and lay.width == 6
    assert lay.ids.numel() == 5 + 3 + 4 + 2 + 6 + 1 + 3  # each prompt once, no padding
    assert lay.positions[:8].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert lay.positions[8:12].tolist() == [5, 6, 7, 8]  # completion 0 continues after its prompt
    assert lay.positions[-3:].tolist() == [3, 4, 5]  # row 5 (prompt of length 3)
    assert lay.predictors.numel() == 4 + 1 + 2 + 6 + 1 + 3  # the empty row predicts t = 0 (zeroed)


def test_rows_of_very_different_lengths_get_two_attention_segments():
    """Short rows padded to the longest would pay for slots they do not have: they get their own SDPA call
    (the float64 equality with the padded forward is CASES["two_segments"]); similar rows stay in one."""
    from r1kit.trainers.packed_forward import _segments

    ro = make_rollout([5, 3], [2, 1, 0, 90, 3, 88, 2, 2], 4)
    lay = pack_rows(ro, torch.arange(8))
    assert [(seg.rows, seg.width) for seg in lay.segments] == [(6, 3), (2, 90)]
    assert sorted(lay.out_index.tolist()) == lay.out_index.unique().tolist()  # every token has its own slot
    assert _segments([60, 64, 58, 64], 40) == [[0, 1, 2, 3]]
    assert _segments([0], 3) == [[0]]


def test_all_empty_micro_batch_keeps_a_graph():
    model = make_model()
    ro = make_rollout([4, 6], [0, 0, 0, 0], 2)
    lp, _, tc = packed(model, ro, torch.arange(4))
    assert tc == 1 and (lp == 0).all() and lp.requires_grad
    lp.sum().backward()  # what update() does with a loss over no tokens: no error, zero gradients


def test_gapped_completion_mask_is_an_error():
    ro = make_rollout([4], [3, 2], 2)
    ro.completion_mask[0, 1] = 0
    with pytest.raises(R1KitError, match="completion_mask"):
        pack_rows(ro, torch.arange(2))


def test_unsupported_models_fall_back_to_the_padded_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)).double().eval()
    assert "model_type" in packed_problem(model)
    ro = make_rollout([4, 3], [3, 2, 5, 1], 2)
    idx = torch.arange(4)
    lp, _, tc = completion_logprobs(model, ro, idx, 1.0, packed=True)
    want, _, _ = padded(model, ro, idx)
    assert torch.equal(lp, want)


def test_bf16_autocast_is_close_to_float32_and_keeps_float32_grads():
    model = make_model(dtype=torch.float32, layers=2)
    ro = make_rollout([6, 9], [8, 3, 5, 7], 2)
    idx = torch.arange(4)
    ref, _, _ = packed(model, ro, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Policy.autocast() does for mixed_precision=bf16
        lp, _, _ = packed(model, ro, idx)
        with torch.no_grad():  # grpo.recompute_old_logprobs: the same bf16 forward, so the first ratio is exactly 1
            old, _, _ = packed(model, ro, idx)
    assert torch.equal(old, lp.detach())
    valid = ro.completion_mask > 0
    assert lp.dtype == torch.float32
    err = (lp - ref)[valid].abs().max()
    assert 0 < err < 0.1  # bf16 rounding shows, but stays small
    lp.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_and_wrappers_fall_back():
    model = make_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "gradient checkpointing" in packed_problem(model)
    wrapped = torch.nn.Sequential(make_model())  # e.g. a DDP-style wrapper: no config, no model tree
    assert packed_problem(wrapped) is not None


def test_grpo_trainer_packed_update_equals_the_padded_update(tmp_path):
    """One GRPOTrainer step (2 updates, micro-batches cutting groups, KL to a reference, entropy bonus,
    recomputed old logprobs) with grpo.packed_update on and off: the same metrics and weights (float32)."""
    from r1kit.config import RunConfig, load_config
    from r1kit.policy import Policy
    from r1kit.rewards import REWARD_FUNCS, register_reward
    from r1kit.tasks import make_task
    from r1kit.trainers.grpo import GRPOTrainer
    from tests.helpers import tiny_pair

    if "test_length_spread" not in REWARD_FUNCS:
        register_reward("test_length_spread")(lambda completion, problem: len(completion) % 3 / 2)
    torch.set_num_threads(1)
    out = {}
    for packed_on in (False, True):
        model, tok = tiny_pair(layers=2)
        ref, _ = tiny_pair(layers=2)
        cfg = load_config(RunConfig, None, [
            "log.progress=false", "log.tensorboard=false", "log.save_every=0", "log.sample_every=0", "eval.every=0",
            "grpo.prompts_per_step=3", "grpo.group_size=4", "grpo.max_new_tokens=12", "grpo.steps=1",
            "grpo.updates_per_batch=2", "grpo.micro_batch_size=5", "grpo.beta=0.04", "grpo.entropy_coef=0.01",
            "grpo.recompute_old_logprobs=true", "grpo.lr=1e-3", "grpo.reward_weights={test_length_spread: 1.0}",
            f"grpo.packed_update={str(packed_on).lower()}", f"output_dir={tmp_path}", f"name=p{int(packed_on)}"])
        trainer = GRPOTrainer(cfg, Policy(model, tok, device="cpu"), make_task("arithmetic", min_digits=1, max_digits=2),
                              cfg.run_dir, ref_model=ref)
        record, batch = trainer.step()
        out[packed_on] = (record, batch, {n: p.detach().clone() for n, p in model.named_parameters()})
    (ra, ba, wa), (rb, bb, wb) = out[False], out[True]
    assert torch.equal(ba.rollout.completion_ids, bb.rollout.completion_ids)  # same samples
    assert ba.rollout.lengths.float().std() > 0 and ba.advantages.abs().max() > 0  # ragged, something to learn
    valid = ba.rollout.completion_mask > 0
    assert (ba.old_logprobs - bb.old_logprobs)[valid].abs().max() < 1e-5  # recomputed by _forward, packed
    assert (ba.ref_logprobs - bb.ref_logprobs)[valid].abs().max() < 1e-5
    for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "approx_kl", "clip_frac"):
        assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), key
    moved = max(float((wa[n] - p).abs().max()) for n, p in tiny_pair(layers=2)[0].named_parameters())
    assert moved > 1e-4  # the step changed the weights
    for n in wa:
        assert (wa[n] - wb[n]).abs().max() <= 1e-5, n


def test_a_sliding_window_shorter_than_the_batch_falls_back_with_a_warning():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=None, eos_token_id=1)
    ro = make_rollout([5, 3], [6, 2, 4, 7], 2)
    idx = torch.arange(4)
    wide = MistralForCausalLM(MistralConfig(sliding_window=64, **cfg)).double()
    assert packed_problem(wide) is None
    lp, _, _ = completion_logprobs(wide, ro, idx, 1.0, packed=True)
    want, _, _ = padded(wide, ro, idx)
    assert (lp - want)[ro.completion_mask > 0].abs().max() <= 1e-10
    narrow = MistralForCausalLM(MistralConfig(sliding_window=4, **cfg)).double()
    with pytest.warns(UserWarning, match="sliding window 4; using the padded forward"):
        lp, _, _ = completion_logprobs(narrow, ro, idx, 1.0, packed=True)
    assert torch.equal(lp, padded(narrow, ro, idx)[0])


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 1)])
def test_packed_pretraining_loss_and_gradients_equal_the_padded_batch_loss(arch, kv):
    from r1kit.trainers.packed_forward import packed_batch_loss
    from r1kit.trainers.pretrain import batch_loss

    model = make_model(arch=arch, kv_heads=kv).train()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 17, 1, 12)]  # a 1-token doc too
    results = []
    for fn in (lambda: batch_loss(model, docs, PAD, per=40.0), lambda: packed_batch_loss(model, docs, per=40.0)):
        model.zero_grad(set_to_none=True)
        objective, mean = fn()
        objective.backward()
        results.append((objective.detach(), mean, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (oa, ma, ga), (ob, mb, gb) = results
    # both take the cross-entropy on float32 logits (as training does): its sum, in another order, rounds
    # at float32 level; the gradient per logit does not depend on that order
    assert abs(oa - ob) <= 1e-6 and abs(ma - mb) <= 1e-6
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= 1e-10, n


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 1)])
def test_a_prefix_shared_by_every_document_runs_once_with_the_same_loss_and_gradients(arch, kv):
    """Stage 0's documents all start with the template's text: the prefix runs once, its predictions weigh
    once per document, and the loss and gradients equal the padded batch's (float64, 1e-10)."""
    from r1kit.trainers.packed_forward import pack_documents, packed_batch_loss
    from r1kit.trainers.pretrain import batch_loss

    model = make_model(arch=arch, kv_heads=kv).train()
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(2, VOCAB, (7,), generator=g).tolist()
    # remainders of 0 to 40 tokens; one document shares 2 more tokens with another (the prefix stays common)
    docs = [prefix + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 3, 40, 0, 12)]
    docs[2] = docs[1][:9] + docs[2][7:]
    lay = pack_documents(docs)
    assert lay.num_units == 1 and lay.prompt_width == 6  # cut one short of the shortest document (the prefix)
    assert lay.ids.numel() == sum(map(len, docs)) - 5 * 6  # the shared part once
    assert lay.targets.numel() == sum(len(d) - 1 for d in docs)  # every prediction, the prefix's once per document
    assert pack_documents(docs, share_prefix=False).ids.numel() == sum(map(len, docs))
    results = []
    for fn in (lambda: batch_loss(model, docs, PAD, per=70.0), lambda: packed_batch_loss(model, docs, per=70.0),
               lambda: packed_batch_loss(model, docs, per=70.0, share_prefix=False)):
        model.zero_grad(set_to_none=True)
        objective, mean = fn()
        objective.backward()
        results.append((objective.detach(), mean, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (oa, ma, ga) = results[0]
    for ob, mb, gb in results[1:]:
        assert abs(oa - ob) <= 1e-6 and abs(ma - mb) <= 1e-6  # float32 logits' cross-entropy, as training
        for n in ga:
            assert (ga[n] - gb[n]).abs().max() <= 1e-10, n


def test_packed_pretraining_trains_the_same_model():
    """pretrain(packed=True) draws the same batches in the same order with the same token weights as the
    padded run: after 6 steps (mixed-length batches, lr 3e-3) the weights agree to float32 rounding."""
    import random

    from r1kit.config import PretrainConfig
    from r1kit.corpus import build_corpus
    from r1kit.policy import Policy
    from r1kit.tasks import make_task
    from r1kit.trainers.pretrain import pretrain
    from tests.helpers import tiny_pair

    torch.set_num_threads(1)
    docs = build_corpus(make_task("arithmetic", min_digits=1, max_digits=3), 64, 0.5, 0.2, "r1_zero", random.Random(0))
    weights, logs = [], []
    for packed_on in (False, True):
        model, tok = tiny_pair(layers=2)
        cfg = PretrainConfig(steps=6, batch_size=8, warmup_steps=2, packed=packed_on)
        logs.append(pretrain(Policy(model, tok, device="cpu"), docs, cfg, seed=0, show_progress=False))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = tiny_pair(layers=2)[0].state_dict()
    assert max(float((weights[0][n] - start[n]).abs().max()) for n in weights[0]) > 1e-3  # it trained
    for n in weights[0]:
        assert (weights[0][n] - weights[1][n]).abs().max() <= 2e-5, n
    assert abs(logs[0][0]["loss"] - logs[1][0]["loss"]) <= 1e-5
