"""Any Hugging Face causal LM: Llama, Qwen2, Qwen3, Mistral, Gemma, Phi-3 and GPT-2 type models, built from configs
(no downloads) with a locally trained tokenizer and its chat template, each through SFT (chat data), GRPO (2 steps),
`r1kit eval` and `r1kit generate`. The engine takes its fast path where the architecture allows it and the HF
forward otherwise, with the reason logged; either way its logprobs equal the trainer's."""
from __future__ import annotations

import json

import pytest
import torch

from r1kit.config import ModelConfig, RunConfig, SFTConfig, load_config
from r1kit.model import TINY_ARCHS, build_tiny_model, load_model, save_model, token_logprobs
from r1kit.policy import Policy
from r1kit.tasks import make_task
from r1kit.trainers.grpo import GRPOTrainer, micro_inputs
from r1kit.trainers.sft import encode_record, train_sft
from tests.helpers import tiny_pair

FAST = {"llama", "qwen2", "mistral"}  # r1kit.engine.fast_llama.FAST_MODEL_TYPES


@pytest.fixture(scope="module")
def tok():
    return tiny_pair()[1]


@pytest.fixture(params=sorted(TINY_ARCHS))
def folder(request, tok, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=request.param, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_position_embeddings=256)
    model = build_tiny_model(cfg, tok)
    save_model(model, tok, tmp_path / request.param)
    return tmp_path / request.param


def test_engine_path_and_logprob_parity(folder, capsys):
    arch = folder.name
    policy = Policy.load(folder)
    engine = policy.make_engine()
    assert (engine.fallback_reason is None) == (arch in FAST), engine.fallback_reason
    if arch not in FAST:  # the fallback is said out loud, with its reason
        assert f"through the HF forward ({engine.fallback_reason})" in capsys.readouterr().err
    tok = policy.tokenizer
    prompts = [tok(f"User: {a}+{b}\nAssistant:").input_ids for a, b in [(1, 2), (30, 4)]]
    ro = engine.generate(prompts, group_size=3, max_new_tokens=10, temperature=1.0, generator=policy.generator(0))
    ids, mask, tc = micro_inputs(ro, torch.arange(ro.num_rows))
    with torch.no_grad():
        lp, _ = token_logprobs(policy.module, ids, mask, tc, 1.0)
    m = ro.completion_mask[:, :tc].bool()
    torch.testing.assert_close(lp[m], ro.logprobs[:, :tc][m], rtol=0, atol=1e-4)


def test_sft_grpo_eval_generate(folder, tmp_path, capsys):
    from r1kit.cli import main

    torch.set_num_threads(1)
    policy = Policy.load(folder)
    tok = policy.tokenizer
    assert tok.chat_template  # SFT data as chat messages, rendered with the model's own template
    records = [{"messages": [{"role": "user", "content": f"{a}+{a}"},
                             {"role": "assistant", "content": f"<answer> {2 * a} </answer>"}]} for a in range(8)]
    examples = [encode_record(r, tok) for r in records]
    summary = train_sft(policy, examples, SFTConfig(epochs=4, seq_len=64, micro_batch_size=4, lr=1e-2, warmup_steps=1),
                        tmp_path / "sft", seed=0)
    assert summary["last_loss"] < summary["first_loss"]

    cfg = load_config(RunConfig, None, ["log.progress=false", "log.tensorboard=false", "grpo.steps=2",
                                        "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.max_new_tokens=8",
                                        f"output_dir={tmp_path}", "name=g", "eval.every=0", "log.save_every=2",
                                        "grpo.beta=0.02"])
    task = make_task("arithmetic", min_digits=1, max_digits=1, num_test=4)
    recs = GRPOTrainer(cfg, policy, task, cfg.run_dir).train()
    assert [r["step"] for r in recs] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    out = cfg.run_dir / "checkpoints" / "step-000002" / "model"
    reloaded, _ = load_model(out)  # the checkpoint is an HF folder of the same architecture
    assert type(reloaded) is type(policy.module)

    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "2+3", "--n", "2", "--max-new-tokens", "6", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["tokens"] <= 6 for r in rows)
    assert main(["eval", "--model", str(out), "--benchmark", "arithmetic", "--limit", "2", "--k", "2",
                 "--max-new-tokens", "6", "--quiet", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_problems"] == 2


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_models_own_chat_template_and_eos_ids_are_used_everywhere(tmp_path, tok, capsys):
    """task.template=chat renders prompts with the model's chat template in GRPO and eval; the extra EOS ids of
    its generation_config stop sampling in every verb (they come from Policy.eos_token_ids)."""
    import copy

    from r1kit.cli import main
    from r1kit.templates import render_prompt

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHATML
    torch.manual_seed(0)
    model = build_tiny_model(ModelConfig(arch="qwen2", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), chat_tok)
    stop = chat_tok.convert_tokens_to_ids("</answer>")
    model.generation_config.eos_token_id = [chat_tok.eos_token_id, stop]
    save_model(model, chat_tok, tmp_path / "m")
    policy = Policy.load(tmp_path / "m")
    assert policy.eos_token_ids == sorted({chat_tok.eos_token_id, stop})
    text = render_prompt("2+3", "chat", policy.tokenizer)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n")

    cfg = load_config(RunConfig, None, ["log.progress=false", "log.tensorboard=false", "grpo.steps=1",
                                        "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=6",
                                        f"output_dir={tmp_path}", "name=c", "eval.every=0", "task.template=chat"])
    trainer = GRPOTrainer(cfg, policy, make_task("arithmetic", min_digits=1, max_digits=1, num_test=4), cfg.run_dir)
    problems = trainer.task.train_problems(2, __import__("random").Random(0))
    rollout, _ = trainer.generate(problems)
    first = rollout.prompt_ids[0][rollout.prompt_mask[0].bool()].tolist()
    assert first == policy.tokenizer(render_prompt(problems[0].question, "chat", policy.tokenizer)).input_ids
    assert main(["eval", "--model", str(tmp_path / "m"), "--benchmark", "arithmetic", "--limit", "2", "--k", "1",
                 "--max-new-tokens", "4", "--template", "chat", "--quiet", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["num_problems"] == 2
