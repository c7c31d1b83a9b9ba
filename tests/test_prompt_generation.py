"""reftlib.generation: prompts tokenized as training does, left-padded, and batched generation of texts."""

from __future__ import annotations

import pytest
from helpers import randomize
from tiny_models import tiny_model
from tiny_tokenizer import VOCAB, char_ids, tiny_tokenizer

import reftlib
from reftlib.errors import InputError
from reftlib.generation import encode_prompts, generate_texts, tokenize_prompts
from reftlib.training import apply_chat_template, make_supervised_examples

BOS, PAD = VOCAB["<s>"], VOCAB["<pad>"]
PROMPTS = ["hello there", "ab", "what is it", "z"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def reft_model():
    model = tiny_model("llama")
    reft = reftlib.get_reft_model(model, {"layer": 1, "component": "block_output", "low_rank_dimension": 2,
                                          "positions": "l1"})
    randomize(reft, scale=1.0)
    reft.eval()
    return reft


# --------------------------------------------------------------------------- tokenize_prompts
def test_tokenize_prompts_pads_on_the_left(tok):
    batch = tokenize_prompts(tok, ["hello", "ab"])
    assert batch["input_ids"].tolist() == [[BOS, *char_ids("hello")], [PAD] * 3 + [BOS, *char_ids("ab")]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    # the last column is every row's last prompt token, where generation continues and "l1" lands
    assert reftlib.last_position(batch["attention_mask"]).tolist() == [[5], [5]]


def test_tokenize_prompts_matches_the_training_tokenization(tok):
    texts = ["hello", "ab", *apply_chat_template(tiny_tokenizer("llama", chat_template=True), ["hi"])]
    cols = make_supervised_examples(tok, texts, ["x"] * len(texts), max_length=64)
    batch = tokenize_prompts(tok, texts)
    for i, (ids, labels) in enumerate(zip(cols["input_ids"], cols["labels"])):
        prompt = [t for t, label in zip(ids, labels) if label == -100]
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert row == prompt
    assert encode_prompts(tok, texts)[0][2].count(BOS) == 1  # a templated prompt keeps a single BOS


def test_tokenize_prompts_without_pad_token_and_on_a_device():
    tok = tiny_tokenizer("gpt2", pad=False)
    assert tok.pad_token_id is None
    batch = tokenize_prompts(tok, ["abc", "d"], device="meta")  # moved without computing anything
    assert batch["input_ids"].device.type == "meta" and batch["attention_mask"].device.type == "meta"
    batch = tokenize_prompts(tok, ["abc", "d"])
    assert batch["input_ids"][1].tolist() == [0, 0, *char_ids("d")]  # masked filler: any id would do
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize(("texts", "message"), [
    ([], "texts is empty"),
    ("hello", "single string"),
    (["ok", 3], r"texts\[1\] is a int"),
])
def test_tokenize_prompts_rejects_bad_input(texts, message):
    with pytest.raises(InputError, match=message):
        tokenize_prompts(tiny_tokenizer("llama"), texts)


def test_a_prompt_without_tokens_is_an_input_error():
    with pytest.raises(InputError, match="prompt 1 .* has no tokens"):
        tokenize_prompts(tiny_tokenizer("gpt2"), ["abc", ""])  # no BOS: "" has no token at all


# --------------------------------------------------------------------------- generate_texts
GEN = {"max_new_tokens": 5, "min_new_tokens": 5}


def test_generate_texts_batched_equals_one_by_one(tok, reft_model):
    batched = generate_texts(reft_model, tok, PROMPTS, compare=True, batch_size=len(PROMPTS), **GEN)
    singles = [generate_texts(reft_model, tok, [p], compare=True, batch_size=1, **GEN)[0] for p in PROMPTS]
    assert batched == singles
    assert generate_texts(reft_model, tok, PROMPTS, batch_size=3, **GEN) == [(None, s) for _, s in singles]
    assert any(base != steered for base, steered in singles)  # the interventions change something


def test_generate_texts_equals_generate_on_the_tokenized_batch(tok, reft_model):
    """The answers are the decoded new tokens of ReftModel.generate (and, for the base rows, without interventions)."""
    results = generate_texts(reft_model, tok, PROMPTS, compare=True, **GEN)
    batch = tokenize_prompts(tok, PROMPTS)
    kwargs = {**GEN, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    steered = reft_model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    with reft_model.disable_interventions():
        base = reft_model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    assert results == [(decode(b), decode(s)) for b, s in zip(base, steered)]


def test_generate_texts_passes_positions_and_mode(tok, reft_model):
    """``positions`` overrides the saved spec: "f1" (the BOS of every prompt) differs from the saved "l1"."""
    saved = generate_texts(reft_model, tok, PROMPTS, **GEN)
    batch = tokenize_prompts(tok, PROMPTS)
    kwargs = {**GEN, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    for positions, mode in (("f1", "prompt"), (None, "all")):
        out = reft_model.generate(**batch, unit_locations=positions, mode=mode, **kwargs)
        expected = [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, batch["input_ids"].shape[1]:]]
        got = generate_texts(reft_model, tok, PROMPTS, positions=positions, mode=mode, **GEN)
        assert [text for _, text in got] == expected
    assert [t for _, t in generate_texts(reft_model, tok, PROMPTS, positions="f1", mode="prompt", **GEN)] != \
        [t for _, t in saved]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
])
def test_generate_texts_rejects_bad_arguments(tok, reft_model, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate_texts(reft_model, tok, PROMPTS, **kwargs)

