"""End to end on the real offline model SmolLM2-135M-Instruct (Llama architecture)."""

import pytest
import torch
from helpers import randomize

import reftlib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from reftlib.offline import load_default_model

    return load_default_model()


def _chat(tokenizer, questions):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_structure_is_discovered(smol):
    model, _ = smol
    table = reftlib.describe_structure(model)
    assert table["block_output"] == "model.layers.0 (output)"
    assert table["head_output"] == "model.layers.0.self_attn.o_proj (input)"
    reft_model = reftlib.get_reft_model(model, [
        {"layer": 15, "component": "block_output", "low_rank_dimension": 4},
        {"layer": 10, "component": "head_output", "intervention": reftlib.HeadScaleIntervention()},
    ])
    try:
        ivs = reft_model.interventions
        assert ivs["layer_15_block_output"].embed_dim == 576
        assert (ivs["layer_10_head_output"].num_heads, ivs["layer_10_head_output"].head_dim) == (9, 64)
    finally:
        reft_model.detach()


def test_forward_locality_and_detach(smol):
    model, tokenizer = smol
    inputs = _chat(tokenizer, ["What is the capital of France?", "Name a colour."])
    with torch.no_grad():
        base = model(**inputs).logits
    reft_model = reftlib.get_reft_model(model, {"layer": 15, "low_rank_dimension": 4})
    randomize(reft_model, scale=2.0)
    last = reftlib.last_position(inputs["attention_mask"])
    with torch.no_grad():
        out = reft_model(**inputs, unit_locations="l1").logits
    changed = (out - base).abs().amax(-1) > 1e-4
    for row in range(2):
        assert changed[row].nonzero().flatten().tolist() == [int(last[row, 0])]
    reft_model.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_batched_generation_equals_single(smol):
    model, tokenizer = smol
    questions = ["What is the capital of France?", "Hi!", "Name three fruits please."]
    reft_model = reftlib.get_reft_model(model, {"layer": 15, "low_rank_dimension": 4, "positions": "l1"})
    randomize(reft_model, scale=1.0)
    try:
        gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        batch = _chat(tokenizer, questions)
        batched = reft_model.generate(**batch, **gen)
        width = batch["input_ids"].shape[1]
        for i, question in enumerate(questions):
            single_inputs = _chat(tokenizer, [question])
            single = reft_model.generate(**single_inputs, **gen)[0, single_inputs["input_ids"].shape[1]:]
            got = batched[i, width:][: len(single)]
            assert got.tolist() == single.tolist(), f"row {i}"
        with reft_model.disable_interventions():
            base = reft_model.generate(**batch, **gen)
        assert not torch.equal(base, batched)
    finally:
        reft_model.detach()


def test_bf16_model_with_fp32_interventions(smol):
    from reftlib.offline import load_default_model

    model, tokenizer = load_default_model(dtype=torch.bfloat16)
    reft_model = reftlib.get_reft_model(model, {"layer": 15, "low_rank_dimension": 4})
    iv = reft_model.interventions["layer_15_block_output"]
    assert iv.learned_source.weight.dtype == torch.float32
    inputs = _chat(tokenizer, ["Hello"])
    # the last position predicts nothing in the shifted LM loss, so intervene earlier
    out = reft_model(**inputs, unit_locations="f3", labels=inputs["input_ids"])
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert torch.isfinite(iv.rotate_layer.raw.grad).all() and iv.rotate_layer.raw.grad.abs().sum() > 0
