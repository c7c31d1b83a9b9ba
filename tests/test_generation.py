"""Position-aware generation with the KV cache: modes, batching with left padding, beams, sampling."""

import inspect

import pytest
import torch
from helpers import randomize
from tiny_models import tiny_model

import reftlib

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]
PAD = 0


def _reft(family="llama", component="block_output", layer=1):
    model = tiny_model(family)
    reft_model = reftlib.get_reft_model(model, {"layer": layer, "component": component, "low_rank_dimension": 2})
    randomize(reft_model, scale=1.0)
    return model, reft_model


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3"])
@pytest.mark.parametrize("mode", ["prompt", "generated", "prompt+generated", "all"])
def test_batched_left_padded_equals_one_by_one(family, mode):
    _, reft_model = _reft(family)
    singles = [
        reft_model.generate(input_ids=torch.tensor([p]), unit_locations="l1", mode=mode, **GEN)[0, len(p):].tolist()
        for p in PROMPTS
    ]
    ids, mask = _left_pad(PROMPTS)
    batched = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", mode=mode, **GEN)
    assert batched[:, ids.shape[1]:].tolist() == singles


@pytest.mark.parametrize("mode", ["prompt", "generated", "prompt+generated", "all"])
def test_cache_equals_recomputation_without_cache(mode):
    _, reft_model = _reft()
    ids = torch.tensor([PROMPTS[0]])
    with_cache = reft_model.generate(input_ids=ids, unit_locations=[[2, 5]], mode=mode, **GEN)
    without = reft_model.generate(input_ids=ids, unit_locations=[[2, 5]], mode=mode, use_cache=False, **GEN)
    assert torch.equal(with_cache, without)


def test_prompt_mode_equals_manual_greedy_loop():
    """Intervening on prompt positions only == a full forward per step with the same prompt positions."""
    _, reft_model = _reft()
    ids = torch.tensor([PROMPTS[0]])
    generated = reft_model.generate(input_ids=ids, unit_locations=[[3, 5]], **GEN)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            logits = reft_model(input_ids=seq, unit_locations=[[3, 5]]).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_generated_mode_equals_manual_loop():
    _, reft_model = _reft()
    ids = torch.tensor([PROMPTS[1]])
    generated = reft_model.generate(input_ids=ids, intervene_on_prompt=False, **GEN)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            positions = [list(range(ids.shape[1], seq.shape[1]))]
            locations = [[-1]] if not positions[0] else positions
            logits = reft_model(input_ids=seq, unit_locations=locations).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_default_mode_steers_generated_tokens_only_with_every_position_interventions():
    """``mode="auto"``: an every-position intervention acts on generated tokens too, an ``"l1"`` one does not.

    Reference: a greedy loop of full forwards in which the every-position intervention edits the
    whole sequence and the ``"l1"`` one the last prompt token only.
    """
    model = tiny_model("llama")
    config = reftlib.ReftConfig(representations=[
        {"layer": 1, "component": "block_output", "low_rank_dimension": 2, "positions": None},
        {"layer": 2, "component": "block_output", "low_rank_dimension": 2, "positions": "l1"},
    ])
    reft_model = reftlib.get_reft_model(model, config)
    randomize(reft_model, scale=1.0)
    everywhere, last = list(reft_model.interventions)
    ids = torch.tensor([PROMPTS[0]])
    generated = reft_model.generate(input_ids=ids, **GEN)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            logits = reft_model(input_ids=seq, unit_locations={everywhere: None, last: [[ids.shape[1] - 1]]}).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)
    assert torch.equal(generated, reft_model.generate(input_ids=ids, use_cache=False, **GEN))
    assert not torch.equal(generated, reft_model.generate(input_ids=ids, mode="prompt", **GEN))
    # only position-restricted interventions: "auto" is "prompt"
    _, restricted = _reft()
    assert torch.equal(restricted.generate(input_ids=ids, unit_locations="l1", **GEN),
                       restricted.generate(input_ids=ids, unit_locations="l1", mode="prompt", **GEN))


def test_interventions_change_generation_and_disable_restores_base():
    model, reft_model = _reft()
    ids = torch.tensor([PROMPTS[0]])
    base = model.generate(input_ids=ids, **GEN)
    steered = reft_model.generate(input_ids=ids, mode="all", **GEN)
    assert not torch.equal(base, steered)
    with reft_model.disable_interventions():
        assert torch.equal(reft_model.generate(input_ids=ids, mode="all", **GEN), base)
    assert torch.equal(reft_model.generate(input_ids=ids, mode="all", **GEN), steered)


def test_pyreft_style_call_returns_tuple():
    _, reft_model = _reft()
    inputs = {"input_ids": torch.tensor([PROMPTS[0]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    original, steered = reft_model.generate(
        inputs, unit_locations={"sources->base": (None, [[[5]]])}, intervene_on_prompt=True, **GEN
    )
    assert original is None and steered.shape == (1, 12)
    original, steered = reft_model.generate(inputs, unit_locations={"sources->base": (None, [[[5]]])},
                                            output_original_output=True, **GEN)
    assert original.shape == steered.shape
    orig, out = reft_model(inputs, unit_locations={"sources->base": (None, [[[5]]])})
    assert orig is None and out.logits.shape == (1, 6, 128)


def test_beams_and_sampling_expand_positions():
    _, reft_model = _reft()
    ids, mask = _left_pad(PROMPTS[:2])
    beams = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", num_beams=3,
                                num_return_sequences=2, max_new_tokens=4, pad_token_id=PAD)
    assert beams.shape[0] == 4
    torch.manual_seed(0)
    sampled = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", do_sample=True,
                                  num_return_sequences=3, max_new_tokens=4, pad_token_id=PAD, top_k=5)
    assert sampled.shape[0] == 6
    # beam search with one beam == greedy
    one_beam = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", num_beams=1, **GEN)
    greedy = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", **GEN)
    assert torch.equal(one_beam, greedy)


def test_eos_stops_generation():
    _, reft_model = _reft()
    ids = torch.tensor([PROMPTS[0]])
    free = reft_model.generate(input_ids=ids, unit_locations="l1", max_new_tokens=6, do_sample=False)
    eos = int(free[0, 7])
    stopped = reft_model.generate(input_ids=ids, unit_locations="l1", max_new_tokens=6, do_sample=False,
                                  eos_token_id=eos, pad_token_id=PAD)
    assert stopped.shape[1] == 8 and int(stopped[0, -1]) == eos


def test_right_padding_is_rejected_for_generation():
    _, reft_model = _reft()
    ids = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(reftlib.InputError, match="LEFT padding"):
        reft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_unknown_mode():
    _, reft_model = _reft()
    with pytest.raises(reftlib.ReftConfigError, match="generation mode"):
        reft_model.generate(input_ids=torch.tensor([[1, 2]]), mode="sometimes")


def _prompt_and_stack(dtype=torch.float64):
    model = tiny_model("llama", dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([
        {"layer": 1, "component": "block_output", "positions": "l1",
         "intervention": reftlib.LoreftIntervention(low_rank_dimension=2, dtype=name)},
        {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1], dtype=name)},
    ]))
    with torch.no_grad():
        for p in reft_model.adapters.parameters():
            p.normal_(0, 1.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    return reft_model, ids, torch.ones_like(ids)


def _scores(reft_model, ids, mask, **kwargs):
    out = reft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


def test_prompt_prefilled_in_chunks_equals_one_prefill():
    """'l1' falls in the last of three prefill chunks; each chunk edits only its own positions."""
    reft_model, ids, mask = _prompt_and_stack()
    sequences, scores = _scores(reft_model, ids, mask)
    with reft_model.disable_interventions():
        _, base = _scores(reft_model, ids, mask)
    assert not torch.allclose(scores, base)  # the interventions matter
    chunked_sequences, chunked = _scores(reft_model, ids, mask, prefill_chunk_size=3)
    assert torch.equal(sequences, chunked_sequences)
    # float64: chunking changes only the order of a few sums (errors ~1e-15 relative)
    torch.testing.assert_close(chunked, scores, rtol=1e-9, atol=1e-9)


def test_generate_continues_a_cache_filled_by_a_forward_call():
    """A cache already holding the first 4 prompt tokens: the cursor starts at 4, 'l1' is still token 6."""
    from transformers import DynamicCache

    reft_model, ids, mask = _prompt_and_stack()
    sequences, scores = _scores(reft_model, ids, mask)
    cache = DynamicCache(config=reft_model.model.config)
    # transformers >= 5.25 names the argument ``cache``, older releases ``past_key_values``
    name = "cache" if "cache" in inspect.signature(type(reft_model.model).forward).parameters else "past_key_values"
    with torch.no_grad():  # the every-position offsets act on the 4 tokens, 'l1' (token 6) is not among them
        reft_model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True,
                   unit_locations={"layer_1_block_output": [[-1]]}, **{name: cache})
    assert cache.get_seq_length() == 4
    continued_sequences, continued = _scores(reft_model, ids, mask, **{name: cache})
    assert torch.equal(sequences, continued_sequences)
    torch.testing.assert_close(continued, scores, rtol=1e-9, atol=1e-9)
