"""Activation collection: sites x positions in one batched pass, padding, hooks removed, disk shards, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

import reftlib
from reftlib.collect import ACTIVATIONS_INDEX, collect_activations, iter_activation_shards, load_activations
from reftlib.errors import ArgumentTypeError, CheckpointError, InputError, PositionError, ReftConfigError
from reftlib.interventions import SteeringVectorIntervention

TEXTS = ["hello world", "hi", "a longer text here", "abc", "the quick brown fox", "x"]
SITES = [(0, "block_output"), (1, "head_output"), (1, "mlp_input"), (None, "transformer.h.1.attn:output")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hook_snapshot(model):
    """Every module's forward hooks and pre-hooks (the dicts' contents), to compare before and after."""
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}


def one_by_one(model, tokenizer, texts, sites, positions):
    parts = [collect_activations(model, tokenizer, [t], sites, positions, batch_size=1, progress=False) for t in texts]
    return parts


def test_shapes_positions_and_values_match_the_model():
    model, tok = tiny_model("gpt2", dtype=torch.float64), tiny_tokenizer("llama")
    acts = collect_activations(model, tok, TEXTS, SITES, positions="all", batch_size=4, progress=False)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    width = max(lengths)
    assert list(acts) == SITES
    assert acts[(0, "block_output")].shape == (len(TEXTS), width, 32)
    assert acts[(1, "head_output")].shape == (len(TEXTS), width, 4, 8)
    assert acts[(1, "mlp_input")].dtype == torch.float64
    for i, n in enumerate(lengths):
        assert acts.positions[i].tolist() == list(range(n)) + [-1] * (width - n)
        assert not acts[(0, "block_output")][i, n:].any()  # no token there: zeros
    # The same forward on each text alone, read through output_hidden_states (block 0's output).
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            hidden = model(**tok([text], return_tensors="pt"), output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(acts[(0, "block_output")][i, : lengths[i]], hidden, rtol=0, atol=1e-13)
    # Head outputs are the attention output projection's input, split into heads.
    flat = acts[(1, "head_output")].flatten(-2)
    proj = model.transformer.h[1].attn.c_proj
    with torch.no_grad():
        torch.testing.assert_close(proj(flat), acts[(None, "transformer.h.1.attn:output")], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("positions", ["l1", "f2+l2", [[0, 2], [1], [0, 5, 3], [2], [4], [0]]])
def test_position_specs_and_explicit_indices(positions):
    model, tok = tiny_model("gpt2", dtype=torch.float64), tiny_tokenizer("llama")
    every = collect_activations(model, tok, TEXTS, [(1, "block_output")], positions="all", progress=False)
    acts = collect_activations(model, tok, TEXTS, [(1, "block_output")], positions=positions, batch_size=4,
                               progress=False)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    if positions == "l1":
        expected = [[n - 1] for n in lengths]
    elif positions == "f2+l2":
        expected = [[0, 1, n - 2 if n - 2 >= 2 else -1, n - 1 if n - 1 >= 2 else -1] for n in lengths]
    else:
        expected = positions
    for i, row in enumerate(expected):
        got = acts.positions[i].tolist()
        assert got[: len(row)] == row and all(p == -1 for p in got[len(row):])
        for j, p in enumerate(row):
            want = every[(1, "block_output")][i, p] if p >= 0 else torch.zeros(32, dtype=torch.float64)
            torch.testing.assert_close(acts[(1, "block_output")][i, j], want, rtol=0, atol=1e-13)
    assert acts.mask.tolist() == (acts.positions >= 0).tolist()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("positions", ["all", "l1"])
def test_batched_equals_one_by_one_float64(side, positions):
    """GPT-2 computes in float64 throughout (LayerNorm included), so padding may only change the order of
    a few float64 sums: 1e-12 of the activations' scale is ~1e4 ulps of room. Its absolute position
    embeddings make left padding a test of the position ids too."""
    model, tok = tiny_model("gpt2", dtype=torch.float64), tiny_tokenizer("llama")
    tok.padding_side = side
    sites = [(0, "block_output"), (2, "head_output"), (1, "mlp_output")]
    batched = collect_activations(model, tok, TEXTS, sites, positions, batch_size=4, progress=False)
    for i, single in enumerate(one_by_one(model, tok, TEXTS, sites, positions)):
        n = single.positions.shape[1]
        assert batched.positions[i, :n].tolist() == single.positions[0].tolist()
        for site in sites:
            scale = single[site].abs().max()
            torch.testing.assert_close(batched[site][i, :n], single[site][0], rtol=0, atol=1e-12 * float(scale))


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_by_one_llama_float32(side):
    """Llama (rotary positions, grouped-query attention) in float32: padding changes summation order and
    the rounding of each sum (eps 1.2e-7); 3 layers of ~32-term sums stay well within 2e-5 of the scale."""
    model, tok = tiny_model("llama"), tiny_tokenizer("llama")
    tok.padding_side = side
    sites = [(2, "block_output"), (1, "head_output")]
    batched = collect_activations(model, tok, TEXTS, sites, "all", batch_size=3, progress=False)
    for i, single in enumerate(one_by_one(model, tok, TEXTS, sites, "all")):
        n = single.positions.shape[1]
        for site in sites:
            scale = single[site].abs().max()
            torch.testing.assert_close(batched[site][i, :n], single[site][0], rtol=0, atol=2e-5 * float(scale))


def test_hooks_gone_afterwards_also_after_a_failure():
    model, tok = tiny_model("llama"), tiny_tokenizer("llama")
    before = hook_snapshot(model)
    collect_activations(model, tok, TEXTS, [(0, "block_input"), (1, "head_output"), (2, "attention_output")],
                        batch_size=2, progress=False)
    assert hook_snapshot(model) == before

    calls = []

    def fail_on_second_batch(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    handle = model.model.layers[2].register_forward_pre_hook(fail_on_second_batch)
    with_failing_hook = hook_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        collect_activations(model, tok, TEXTS, [(0, "block_input"), (1, "head_output")], batch_size=2, progress=False)
    assert hook_snapshot(model) == with_failing_hook
    handle.remove()
    assert hook_snapshot(model) == before


def test_reft_model_collects_with_its_interventions_and_keeps_its_hooks():
    """Same batches in every call, so the only difference between the runs is the edits themselves:
    each is one float64 addition, reproduced bit for bit."""
    model, tok = tiny_model("llama", dtype=torch.float64), tiny_tokenizer("llama")
    sites = [(1, "block_output"), (2, "block_output")]
    base = collect_activations(model, tok, TEXTS, sites, "all", batch_size=4, progress=False)
    vector = torch.linspace(-1, 1, 32, dtype=torch.float64)
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([
        {"layer": 1, "component": "block_output", "positions": None, "intervention": _steer(vector)},
    ]))
    steered = collect_activations(reft_model, tok, TEXTS, sites, "all", batch_size=4, progress=False)
    reft_model.add_adapter("last", reftlib.ReftConfig([
        {"layer": 2, "component": "block_output", "positions": "l1", "intervention": _steer(vector)},
    ]))
    reft_model.set_adapter(["default", "last"])
    with_hooks = hook_snapshot(model)
    acts = collect_activations(reft_model, tok, TEXTS, sites, "all", batch_size=4, progress=False)
    assert hook_snapshot(model) == with_hooks
    # Layer 1 is read after its edit: base + v at every real token.
    mask = acts.mask.unsqueeze(-1)
    assert torch.equal(steered[(1, "block_output")], base[(1, "block_output")] + vector * mask)
    assert torch.equal(acts[(1, "block_output")], steered[(1, "block_output")])
    assert not torch.equal(steered[(2, "block_output")], base[(2, "block_output")])
    # Layer 2 gets its own edit on each text's last token only ("l1", resolved on the padded batch).
    last = acts.positions.eq(acts.positions.max(dim=1, keepdim=True).values).unsqueeze(-1)
    assert torch.equal(acts[(2, "block_output")], steered[(2, "block_output")] + vector * last)
    with reft_model.disable_interventions():
        plain = collect_activations(reft_model, tok, TEXTS, sites, "all", batch_size=4, progress=False)
    assert torch.equal(plain[(2, "block_output")], base[(2, "block_output")])


def _steer(vector):
    steer = SteeringVectorIntervention(embed_dim=vector.numel(), trainable=False, dtype=vector.dtype)
    steer.set_vector(vector)
    return steer


def test_to_disk_writes_atomic_shards_that_load_back(tmp_path):
    model, tok = tiny_model("gpt2", dtype=torch.float64), tiny_tokenizer("llama")
    sites = [(0, "block_output"), (1, "head_output")]
    memory = collect_activations(model, tok, TEXTS, sites, "all", batch_size=2, progress=False)
    folder = collect_activations(model, tok, TEXTS, sites, "all", batch_size=2, progress=False,
                                 to_disk=tmp_path / "acts", shard_size=3)
    assert folder == tmp_path / "acts"
    files = {p.name for p in folder.iterdir()}  # no temporary files left behind
    assert files == {ACTIVATIONS_INDEX, "activations-00000.safetensors", "activations-00001.safetensors"}
    shards = list(iter_activation_shards(folder))
    assert [s.positions.shape[0] for s in shards] == [4, 2]
    loaded = load_activations(folder)
    assert list(loaded) == sites
    for site in sites:
        assert torch.equal(loaded[site], memory[site])
    assert torch.equal(loaded.positions, memory.positions)
    with pytest.raises(CheckpointError, match="to_disk"):
        load_activations(tmp_path)
    # A pass that fails part-way leaves no index: readers never see a partial (or mixed) collection.
    calls = []

    def fail_on_third_batch(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = model.transformer.h[1].register_forward_pre_hook(fail_on_third_batch)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            collect_activations(model, tok, TEXTS, sites, "all", batch_size=2, progress=False, to_disk=folder,
                                shard_size=3)
    finally:
        handle.remove()
    assert not (folder / ACTIVATIONS_INDEX).exists()
    with pytest.raises(CheckpointError, match="when the pass completes"):
        load_activations(folder)


def test_bad_input_raises_reft_errors_with_a_fix():
    model, tok = tiny_model("llama"), tiny_tokenizer("llama")
    site = [(0, "block_output")]
    with pytest.raises(ArgumentTypeError, match="load the model first"):
        collect_activations("llama", tok, TEXTS, site)
    with pytest.raises(ArgumentTypeError, match="order of the arguments"):
        collect_activations(model, model, TEXTS, site)
    with pytest.raises(ArgumentTypeError, match="wrap a single text"):
        collect_activations(model, tok, "hello", site)
    with pytest.raises(InputError, match=r"texts\[1\]"):
        collect_activations(model, tok, ["a", 3], site)
    with pytest.raises(ReftConfigError, match=r"pass a list of sites: \[\(0, 'block_output'\)\]"):
        collect_activations(model, tok, TEXTS, (0, "block_output"))
    with pytest.raises(ReftConfigError, match="unknown component 'block'"):
        collect_activations(model, tok, TEXTS, [(0, "block")])
    with pytest.raises(ReftConfigError, match="listed twice"):
        collect_activations(model, tok, TEXTS, site * 2)
    with pytest.raises(ReftConfigError, match="layer 7 does not exist"):
        collect_activations(model, tok, TEXTS, [(7, "block_output")])
    with pytest.raises(PositionError, match="cannot parse position spec"):
        collect_activations(model, tok, TEXTS, site, positions="last")
    with pytest.raises(PositionError, match="one list per text"):
        collect_activations(model, tok, TEXTS, site, positions=[[0]])
    with pytest.raises(PositionError, match=r"text 1 has 3 tokens .* \[3\]"):
        collect_activations(model, tok, ["hello", "hi"], site, positions=[[0], [3]], progress=False)
    with pytest.raises(ReftConfigError, match="batch_size"):
        collect_activations(model, tok, TEXTS, site, batch_size=0)
    with pytest.raises(ReftConfigError, match="pad_token = tokenizer.eos_token"):
        collect_activations(model, tiny_tokenizer("llama", pad=False), TEXTS, site)
    with pytest.raises(InputError, match="max_length=128"):
        collect_activations(model, tok, ["a" * 200], site, progress=False)
    with pytest.raises(InputError, match="text 1 .* has no tokens"):
        collect_activations(model, tiny_tokenizer("gpt2"), ["a", ""], site, progress=False)
    # Truncation makes the long text usable.
    acts = collect_activations(model, tok, ["a" * 200], site, max_length=128, progress=False)
    assert acts.positions.tolist() == [[127]]
