"""Position specs, unit_locations forms, validation, and gather/scatter properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reftlib
from reftlib.errors import PositionError
from reftlib.hooks import apply_at_positions
from reftlib.positions import normalize_unit_locations, parse_position_spec, resolve_position_spec


def test_parse_specs():
    assert parse_position_spec("l1") == (0, 1)
    assert parse_position_spec("f7+l7") == (7, 7)
    assert parse_position_spec("L3+F2") == (2, 3)
    assert parse_position_spec("all") is None
    for bad in ["", "x1", "f0", "f1+f2", "l", "f-1", "first"]:
        with pytest.raises(PositionError):
            parse_position_spec(bad)


def test_resolve_with_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert resolve_position_spec("l1", right).tolist() == [[3], [5]]
    assert resolve_position_spec("l1", left).tolist() == [[5], [5]]
    assert resolve_position_spec("f2", left).tolist() == [[2, 3], [0, 1]]
    assert resolve_position_spec("f2+l2", right).tolist() == [[0, 1, 2, 3], [0, 1, 4, 5]]


def test_short_rows_are_masked_without_duplicates():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8])
    out = resolve_position_spec("f3+l3", mask)
    assert out.tolist() == [[0, 1, 2, -1, -1, -1], [0, 1, 2, 5, 6, 7]]
    out = resolve_position_spec("f2+l2", torch.tensor([[1, 1, 1]]))
    assert out.tolist() == [[0, 1, -1, 2]]
    assert resolve_position_spec("l4", torch.tensor([[0, 1, 1]])).tolist() == [[-1, -1, 1, 2]]


def test_normalize_forms_agree():
    mask = torch.ones(2, 6, dtype=torch.long)
    keys = ["a", "b"]
    explicit = normalize_unit_locations([[5], [5]], keys, {}, mask)
    assert all(v.tolist() == [[5], [5]] for v in explicit.values())
    spec = normalize_unit_locations("l1", keys, {}, mask)
    assert {k: v.tolist() for k, v in spec.items()} == {k: v.tolist() for k, v in explicit.items()}
    pyreft = normalize_unit_locations({"sources->base": (None, [[[5], [5]], [[0], [1]]])}, keys, {}, mask)
    assert pyreft["a"].tolist() == [[5], [5]] and pyreft["b"].tolist() == [[0], [1]]
    per_key = normalize_unit_locations({"b": torch.tensor([[0], [1]])}, keys, {"a": "l1"}, mask)
    assert per_key["a"].tolist() == [[5], [5]] and per_key["b"].tolist() == [[0], [1]]
    stacked = normalize_unit_locations(torch.tensor([[[1], [2]], [[3], [4]]]), keys, {}, mask)
    assert stacked["b"].tolist() == [[3], [4]]
    defaults = normalize_unit_locations(None, keys, {"a": None, "b": "f1"}, mask)
    assert defaults["a"] is None and defaults["b"].tolist() == [[0], [0]]
    ragged = normalize_unit_locations([[1, 2], [3]], keys, {}, mask)
    assert ragged["a"].tolist() == [[1, 2], [3, -1]]


@pytest.mark.parametrize(
    "locations,message",
    [
        ([[9], [1]], "out of range"),
        ([[-2], [1]], "negative position"),
        ([[1]], "batch size 1 but the inputs have 2 rows"),
        ([[1, 1], [2, 3]], "same position twice"),
        ([[1.5], [2]], "must be integers"),
        (torch.tensor([1, 2]), r"\[batch, n_positions\]"),
        (torch.tensor([[0.5], [1.0]]), "must be integers"),
        ([[[[1]]]], "4 levels"),
        ({"sources->base": (None, [[[1], [1]]] * 3)}, "3 intervention"),
        ({"zzz": [[1], [1]]}, "unknown interventions"),
        ({"sources->base": ([[[0]]], [[[1], [1]]] * 2)}, "source positions"),
        ("f0", "at least 1"),
    ],
)
def test_bad_locations(locations, message):
    mask = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(PositionError, match=message):
        normalize_unit_locations(locations, ["a", "b"], {}, mask)


class _AddOne(torch.nn.Module):
    def delta(self, h):
        return torch.ones_like(h)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 9),
    width=st.integers(1, 3),
    data=st.data(),
)
def test_scatter_touches_exactly_the_valid_positions(batch, length, width, data):
    rows = []
    for _ in range(batch):
        chosen = data.draw(st.lists(st.integers(0, length - 1), unique=True, max_size=length))
        pad = data.draw(st.integers(0, 3))
        row = chosen + [-1] * pad
        rows.append(data.draw(st.permutations(row)))
    n = max(len(r) for r in rows)
    positions = torch.tensor([r + [-1] * (n - len(r)) for r in rows], dtype=torch.long).reshape(batch, n)
    h = torch.randn(batch, length, width)
    valid = positions >= 0
    idx = positions.clamp(min=0)
    rows_idx = torch.arange(batch).unsqueeze(1).expand_as(idx)
    out = apply_at_positions(h, _AddOne(), rows_idx, idx, valid)
    expected = h.clone()
    for b, row in enumerate(rows):
        for p in row:
            if p >= 0:
                expected[b, p] += 1
    assert torch.equal(out, expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=5), st.integers(1, 4), st.integers(0, 4), st.booleans())
def test_spec_lands_on_real_tokens(lengths, n_first, n_last, left):
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, width - n:] = 1
        else:
            mask[i, :n] = 1
    spec = f"f{n_first}" + (f"+l{n_last}" if n_last else "")
    out = resolve_position_spec(spec, mask)
    for i, n in enumerate(lengths):
        real = mask[i].nonzero().flatten().tolist()
        chosen = [p for p in out[i].tolist() if p >= 0]
        assert len(chosen) == len(set(chosen))
        assert set(chosen) == set(real[:n_first]) | set(real[max(n - n_last, 0):] if n_last else [])


def test_positions_are_not_left_on_the_model():
    """A per-row call after a broadcast-style call must use its own positions (a pyvene bug)."""
    from helpers import randomize
    from tiny_models import tiny_model

    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, {"layer": 1, "low_rank_dimension": 2})
    randomize(reft_model)
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        reft_model(input_ids=ids, unit_locations="l1")  # same spec for all rows
        mixed = reft_model(input_ids=ids, unit_locations=[[1], [4]]).logits
        row1 = reft_model(input_ids=ids[1:], unit_locations=[[4]]).logits
        outside = model(input_ids=ids).logits
        base = reft_model.model(input_ids=ids).logits
    torch.testing.assert_close(mixed[1:], row1)
    assert torch.equal(outside, base)  # calling the base model directly never intervenes
