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


# Tiny models from a config, for every architecture r1kit is tested with (tests/test_architectures.py):
# model.arch -> (HF model_type, extra config fields). head_dim is pinned where the HF default is not hidden/heads.
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": None}),
    "mistral": ("mistral", {"head_dim": None}),
    "gemma": ("gemma", {"head_dim": None}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {}),
}


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A small causal LM of type `cfg.arch` (see TINY_ARCHS), randomly initialised from `cfg`."""
    if cfg.arch not in TINY_ARCHS:
        raise R1KitError(f"model.arch: unknown tiny architecture {cfg.arch!r}; expected one of {sorted(TINY_ARCHS)}")
    model_type, extra = TINY_ARCHS[cfg.arch]
    ids = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               vocab_size=len(tokenizer), tie_word_embeddings=True)
    if model_type == "gpt2":
        fields = dict(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings)
    else:
        fields = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                      num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                      max_position_embeddings=cfg.max_position_embeddings)
        fields.update({k: cfg.hidden_size // cfg.num_heads for k in extra if k == "head_dim"})
    config = AutoConfig.for_model(model_type, **fields, **ids)
    return AutoModelForCausalLM.from_config(config)


def save_model(model: torch.nn.Module, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """Write an HF folder (weights as safetensors, config, tokenizer) into `path` (caller makes it atomic);
    `state_dict` replaces the module's own (full weights of a sharded module)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    save_tokenizer(tokenizer, path)


def save_tokenizer(tokenizer, path: Path) -> None:
    """The tokenizer files of an HF folder; our own fast tokenizers are marked so `load_tokenizer` keeps them."""
    path = Path(path)
    tokenizer.save_pretrained(path)
    tc = path / "tokenizer_config.json"
    if tc.exists() and isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer) is PreTrainedTokenizerFast:
        data = json.loads(tc.read_text())
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc.write_text(json.dumps(data, indent=2))


def load_tokenizer(path: str | Path):
    path = Path(path)
    tc = path / "tokenizer_config.json"
    try:
        if tc.exists() and json.loads(tc.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise R1KitError(f"model path {str(path)!r}: cannot load its tokenizer ({e})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def weight_files(folder: Path, name: str | None = None) -> list[Path]:
    """The safetensors files holding a folder's weights: `name` (e.g. adapter_model.safetensors), or
    model.safetensors, or the shards a model.safetensors.index.json lists. R1KitError naming what is missing."""
    folder = Path(folder)
    if name is not None or (folder / "model.safetensors").exists():
        f = folder / (name or "model.safetensors")
        if not f.exists():
            raise R1KitError(f"model path {str(folder)!r} has no {f.name}")
        return [f]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise R1KitError(f"model path {str(folder)!r}: {index.name} is not a safetensors index ({e})") from e
        absent = [s for s in shards if not (folder / s).exists()]
        if absent:
            raise R1KitError(f"model path {str(folder)!r}: {index.name} lists shards that are missing: {absent[:4]}")
        return [folder / s for s in shards]
    raise R1KitError(f"model path {str(folder)!r} has no weights (model.safetensors or a sharded index)")


def check_weight_files(folder: Path, name: str | None = None) -> None:
    """Open every weight file's header, so a truncated or corrupt file is an R1KitError naming it (instead of
    a raw SafetensorError deep inside transformers). Folders with only .bin weights are left to transformers."""
    from safetensors import safe_open

    folder = Path(folder)
    if name is None and not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
        return
    for f in weight_files(folder, name):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # SafetensorError and friends: the file is damaged
            raise R1KitError(f"model weights {str(f)!r} cannot be read ({e}): the file is truncated or corrupt; "
                             "save or copy the model again") from e


def read_weights(folder: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors weights (single file or shards), checked first."""
    from safetensors.torch import load_file

    check_weight_files(folder, name)
    weights: dict[str, torch.Tensor] = {}
    for f in weight_files(folder, name):
        weights.update(load_file(str(f)))
    return weights


def load_model(path: str | Path, dtype: str = "float32"):
    """Load (model, tokenizer) from a local HF causal-LM folder, a LoRA adapter folder (merged into its base),
    or a hub name when online. The one loading path: every bad folder is an R1KitError naming it."""
    p = Path(path)
    where = str(p) if p.exists() else str(path)
    if p.exists() and not (p / "config.json").exists():
        if (p / "adapter_config.json").exists():
            return _load_adapter_folder(p, dtype)
        raise R1KitError(f"model path {where!r} has no config.json: not a Hugging Face model folder")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise R1KitError(f"model.dtype={dtype!r}; expected float32, bfloat16 or float16")
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise R1KitError(f"model path {where!r}: cannot read a model config ({e})") from e
    if p.exists():
        check_weight_files(p)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), output_loading_info=True)
    except ValueError as e:
        raise R1KitError(f"model path {where!r} ({config.model_type}) is not a causal LM: {e}") from e
    except Exception as e:  # OSError, SafetensorError, a damaged .bin: name the folder, not a traceback
        raise R1KitError(f"model path {where!r}: cannot load weights ({type(e).__name__}: {e})") from e
    missing = [k for k in info.get("missing_keys", []) if not (k.startswith("lm_head") and model.config.tie_word_embeddings)]
    if missing:
        raise R1KitError(f"model path {where!r} ({config.model_type}) lacks causal-LM weights {sorted(missing)[:4]}: "
                         "it is not a causal LM checkpoint")
    if p.exists():
        model.name_or_path = str(p.resolve())  # a LoRA adapter saved from it names this base folder
    return model, load_tokenizer(where)


def load_classifier(path: str | Path, dtype: str = "float32", num_labels: int | None = None):
    """A `...ForSequenceClassification` from a local HF folder: a trained classifier, or (with num_labels) a
    causal LM's backbone under a fresh score head. The reward models' half of the one loading path."""
    from transformers import AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "config.json").exists():
        raise R1KitError(f"model path {str(p)!r} is not a Hugging Face model folder (no config.json)")
    check_weight_files(p)
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(p), dtype=getattr(torch, dtype), **kwargs)
    except (ValueError, OSError) as e:
        raise R1KitError(f"model path {str(p)!r} cannot become a sequence classifier: {e}") from e


def lora_targets(names) -> str | list[str]:
    """peft's target_modules from the config's list: ["all-linear"] -> "all-linear" (every linear layer but
    the output head), else the list of module names."""
    names = list(names)
    return "all-linear" if names == ["all-linear"] else names


def untie_output_embeddings(model: torch.nn.Module) -> None:
    """Give lm_head its own copy of the tied embedding matrix (same values), so an adapter on lm_head, once
    merged, changes the output layer only."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _load_adapter_folder(folder: Path, dtype: str):
    """A LoRA adapter folder (an r1kit checkpoint of a LoRA run): its base model with the adapter merged in."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise R1KitError(f"adapter folder {str(folder)!r}: adapter_config.json names no base model ({e})") from e
    if not base:
        raise R1KitError(f"adapter folder {str(folder)!r}: adapter_config.json names no base model")
    try:
        from peft import PeftModel
    except ImportError as e:
        raise R1KitError(f"{str(folder)!r} is a LoRA adapter; loading it needs peft: pip install 'r1kit[lora]'") from e
    model, tokenizer = load_model(base, dtype)
    check_weight_files(folder, "adapter_model.safetensors")
    targets = json.loads((folder / "adapter_config.json").read_text()).get("target_modules") or []
    if "lm_head" in lora_targets(targets if isinstance(targets, list) else [targets]):
        untie_output_embeddings(model)  # as at training time (r1kit.policy): the merge must not touch the inputs
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    has_tokenizer = (folder / "tokenizer_config.json").exists()
    return merged, load_tokenizer(folder) if has_tokenizer else tokenizer


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
