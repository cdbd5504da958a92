"""Models and tokenizers: tiny HF causal LMs from a config, a locally trained tokenizer, load/save.

Everything is a plain Hugging Face folder (`save_pretrained`/`from_pretrained`), so a tiny r1kit model
and any local HF causal LM are interchangeable wherever a model path is accepted.

Known trap (transformers 5): `AutoTokenizer` may swap a locally trained tokenizer saved in a
Qwen2-type folder for `Qwen2Tokenizer`, which silently drops spaces and newlines. We write
`tokenizer_class: PreTrainedTokenizerFast` into our folders and load our own folders through
`PreTrainedTokenizerFast` directly; tests check the encode/decode round trip through the saved folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from r1kit.config import ModelConfig
from r1kit.templates import SPECIAL_TAGS
from r1kit.types import R1KitError

EOS, PAD = "<|endoftext|>", "<|pad|>"

# system text = the instruction; then "User: ...\nAssistant:" turns, as in the R1-Zero template.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}" + EOS + "\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; digits are always single tokens (arithmetic needs them),
    the four reasoning tags are single tokens that decode back to themselves."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, *SPECIAL_TAGS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    # Tags are ordinary text to the model (kept by decode), but must never be split.
    fast.add_tokens(list(SPECIAL_TAGS))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A small Llama- or Qwen2-type causal LM, randomly initialised from `cfg`."""
    common = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common))
    if cfg.arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise R1KitError(f"model.arch: unknown tiny architecture {cfg.arch!r}; expected 'llama' or 'qwen2'")


def save_model(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """Write an HF folder (weights as safetensors, config, tokenizer) into `path` (caller makes it atomic)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tc = path / "tokenizer_config.json"
    if tc.exists() and isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer) is PreTrainedTokenizerFast:
        data = json.loads(tc.read_text())
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc.write_text(json.dumps(data, indent=2))


def load_tokenizer(path: str | Path):
    path = Path(path)
    tc = path / "tokenizer_config.json"
    if tc.exists() and json.loads(tc.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: str = "float32"):
    """Load (model, tokenizer) from a local HF causal-LM folder (or a hub name when online)."""
    p = Path(path)
    where = str(p) if p.exists() else str(path)
    if p.exists() and not (p / "config.json").exists():
        raise R1KitError(f"model path {where!r} has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise R1KitError(f"model path {where!r}: cannot read a model config ({e})") from e
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), output_loading_info=True)
    except ValueError as e:
        raise R1KitError(f"model path {where!r} ({config.model_type}) is not a causal LM: {e}") from e
    except OSError as e:
        raise R1KitError(f"model path {where!r}: cannot load weights ({e})") from e
    missing = [k for k in info.get("missing_keys", []) if not (k.startswith("lm_head") and model.config.tie_word_embeddings)]
    if missing:
        raise R1KitError(f"model path {where!r} ({config.model_type}) lacks causal-LM weights {sorted(missing)[:4]}: "
                         "it is not a causal LM checkpoint")
    return model, load_tokenizer(where)


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion: int,
    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log p of each of the last `num_completion` tokens given everything before it.

    input_ids/attention_mask: [B, T] (prompt left-padded, completion right-padded).
    Returns logprobs [B, num_completion] under softmax(logits / temperature) (the engine's convention)
    and, if asked, the per-token entropy [B, num_completion] of that distribution (outside the autograd
    graph when `entropy_grad` is False: a logged metric then costs no [B, Tc, V] activation memory).
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] left padding aware
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=num_completion + 1, use_cache=False)
    logits = out.logits[:, -num_completion - 1 : -1, :].float()  # [B, Tc, V] predicts the completion
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)  # [B, Tc, V]
    targets = input_ids[:, -num_completion:]  # [B, Tc]
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, Tc]
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, Tc]
    return logprobs, entropy
