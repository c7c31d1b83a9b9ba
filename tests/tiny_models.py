"""Tiny randomly initialised models of many architectures, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
HIDDEN = 32
LAYERS = 3

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128)

# family -> (config class, overrides, auto class name)
FAMILIES: dict[str, tuple] = {
    "llama": (tf.LlamaConfig, dict(num_key_value_heads=2), "causal"),
    "mistral": (tf.MistralConfig, dict(num_key_value_heads=2, head_dim=8), "causal"),
    "mixtral": (tf.MixtralConfig, dict(num_key_value_heads=2, head_dim=8, num_local_experts=3,
                                       num_experts_per_tok=2), "causal"),
    "qwen2": (tf.Qwen2Config, dict(num_key_value_heads=2), "causal"),
    "qwen3": (tf.Qwen3Config, dict(num_key_value_heads=2, head_dim=12), "causal"),
    "gemma": (tf.GemmaConfig, dict(num_key_value_heads=1, head_dim=16), "causal"),
    "gemma2": (tf.Gemma2Config, dict(num_key_value_heads=2, head_dim=16, sliding_window=16), "causal"),
    "gemma3_text": (tf.Gemma3TextConfig, dict(num_key_value_heads=2, head_dim=16, sliding_window=16), "causal"),
    "phi3": (tf.Phi3Config, dict(num_key_value_heads=2, pad_token_id=0), "causal"),
    "gpt2": (tf.GPT2Config, dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128, vocab_size=VOCAB), "causal"),
    "gpt_neox": (tf.GPTNeoXConfig, dict(), "causal"),
    "gptj": (tf.GPTJConfig, dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128, rotary_dim=4,
                                 vocab_size=VOCAB), "causal"),
    "opt": (tf.OPTConfig, dict(ffn_dim=64, word_embed_proj_dim=HIDDEN, pad_token_id=1), "causal"),
    "falcon": (tf.FalconConfig, dict(new_decoder_architecture=False, multi_query=True), "causal"),
    "olmo2": (tf.Olmo2Config, dict(num_key_value_heads=2), "causal"),
    "stablelm": (tf.StableLmConfig, dict(num_key_value_heads=2), "causal"),
    "bert": (tf.BertConfig, dict(), "masked"),
    "roberta": (tf.RobertaConfig, dict(pad_token_id=1), "masked"),
}

CAUSAL_FAMILIES = [name for name, spec in FAMILIES.items() if spec[2] == "causal"]
ENCODER_FAMILIES = [name for name, spec in FAMILIES.items() if spec[2] == "masked"]


def tiny_config(family: str):
    config_cls, overrides, _ = FAMILIES[family]
    if family in ("gpt2", "gptj"):
        kwargs = dict(overrides)
    else:
        kwargs = {**_COMMON, **overrides}
    config = config_cls(**kwargs)
    if hasattr(config, "attn_implementation"):
        pass
    return config


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of ``family`` in eval mode (dropout off), deterministic for ``seed``."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    auto = tf.AutoModelForCausalLM if FAMILIES[family][2] == "causal" else tf.AutoModelForMaskedLM
    model = auto.from_config(config, attn_implementation="eager", dtype=dtype)
    return model.eval()
