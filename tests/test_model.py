import json

import pytest
import torch

from r1kit.model import load_model, load_tokenizer, save_model, token_logprobs
from r1kit.templates import SPECIAL_TAGS
from r1kit.types import R1KitError
from tests.helpers import tiny_pair

TEXTS = ["User: 12+34\nAssistant: <think> 2+4+0=6 </think> <answer> 46 </answer>",
         "  two  spaces\n\nand newlines\t tab", "unicode: 中文 ü ✓", ""]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_round_trip(tmp_path, arch):
    model, tok = tiny_pair(arch)
    save_model(model, tok, tmp_path)
    # the Qwen2 trap: AutoTokenizer must not swap in a tokenizer that drops spaces/newlines
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    model2, tok2 = load_model(tmp_path)
    for text in TEXTS:
        ids = tok2(text).input_ids
        assert tok2.decode(ids) == text
        assert ids == tok(text).input_ids
    ids = torch.tensor([tok("User: 1+2\nAssistant:").input_ids])
    assert torch.equal(model(ids).logits, model2(ids).logits)
    assert model2.config.model_type == arch


def test_tags_are_single_tokens_and_chat_template():
    _, tok = tiny_pair()
    for tag in SPECIAL_TAGS:
        assert len(tok(tag).input_ids) == 1
        assert len(tok(f" {tag} ").input_ids) == 3
    assert len(tok("12345").input_ids) == 5  # digits are always single tokens
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "1+2"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "S\nUser: 1+2\nAssistant:"


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(R1KitError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(R1KitError, match=str(tmp_path)):
        load_model(tmp_path)


def test_sequence_classifier_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(R1KitError, match="not a causal LM"):
        load_model(tmp_path)


def test_encoder_decoder_is_not_a_causal_lm(tmp_path):
    from transformers import T5Config, T5Model

    T5Model(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(R1KitError, match="not a causal LM"):
        load_model(tmp_path)


def test_token_logprobs_match_a_plain_forward():
    model, tok = tiny_pair()
    prompt, completion = tok("User: 1+2\nAssistant:").input_ids, tok(" <think> x </think>").input_ids
    ids = torch.tensor([[tok.pad_token_id] * 3 + prompt + completion])  # left padding
    mask = torch.tensor([[0] * 3 + [1] * (len(prompt) + len(completion))])
    lp, ent = token_logprobs(model, ids, mask, len(completion), temperature=0.7, with_entropy=True)
    ref = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0] / 0.7, -1)
    expect = torch.stack([ref[len(prompt) - 1 + i, t] for i, t in enumerate(completion)])
    assert torch.allclose(lp[0], expect, atol=1e-5)
    assert (ent > 0).all()


def test_entropy_as_a_metric_stays_out_of_the_graph():
    model, tok = tiny_pair()
    ids = torch.tensor([tok("User: 1+2\nAssistant: <think> x </think>").input_ids])
    mask = torch.ones_like(ids)
    lp, ent = token_logprobs(model, ids, mask, 4, with_entropy=True, entropy_grad=False)
    lp2, ent2 = token_logprobs(model, ids, mask, 4, with_entropy=True)
    assert lp.requires_grad and not ent.requires_grad and ent2.requires_grad
    assert torch.equal(ent, ent2.detach())
