"""SteeringVectorIntervention: h + v at every position it acts on, trainable or frozen, saved and loaded."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

import reftlib
from reftlib.errors import ReftConfigError
from reftlib.interventions import SteeringVectorIntervention, intervention_class

D = 32


def test_registered_and_exported():
    assert intervention_class("steering_vector") is SteeringVectorIntervention
    assert reftlib.SteeringVectorIntervention is SteeringVectorIntervention
    assert "SteeringVectorIntervention" in reftlib.__all__


def test_formula_and_defaults():
    iv = SteeringVectorIntervention(embed_dim=D)
    h = torch.randn(3, 5, D)
    assert torch.equal(iv(h), h)  # starts at zero: no change
    assert iv.trainable and isinstance(iv.vector, torch.nn.Parameter)
    vector = torch.randn(D)
    iv.set_vector(vector)
    torch.testing.assert_close(iv(h), h + vector, rtol=0, atol=0)
    assert iv.get_config()["type"] == "steering_vector"
    with pytest.raises(ReftConfigError, match="1-D tensor of 32 values"):
        iv.set_vector(torch.zeros(D + 1))
    with pytest.raises(ReftConfigError, match="no width yet"):
        SteeringVectorIntervention().set_vector(vector)


def test_gradient_check():
    iv = SteeringVectorIntervention(embed_dim=6, init_std=1.0, dtype=torch.float64)
    h = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: x + v.expand_as(x), (h, iv.vector))
    # d(sum(w * out))/dv = sum of w over every position; d/dh = w.
    weights = torch.randn(2, 3, 6, dtype=torch.float64)
    (iv(h) * weights).sum().backward()
    torch.testing.assert_close(iv.vector.grad, weights.sum(dim=(0, 1)), rtol=1e-15, atol=0)
    torch.testing.assert_close(h.grad, weights, rtol=0, atol=0)


def test_frozen_vector_is_a_saved_buffer_that_stays_frozen():
    iv = SteeringVectorIntervention(embed_dim=D, trainable=False, init_std=0.5)
    assert not iv.trainable and list(iv.parameters()) == []
    assert "vector" in iv.state_dict()
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([
        {"layer": 1, "component": "block_output", "positions": None, "intervention": iv}]))
    reft_model.set_adapter("default")  # switches requires_grad on every parameter of the adapter
    assert reft_model.count_parameters() == 0


@pytest.mark.parametrize("trainable", [True, False])
def test_save_load_round_trip(tmp_path, trainable):
    tok = tiny_tokenizer("llama")
    model = tiny_model("llama")
    iv = SteeringVectorIntervention(trainable=trainable, init_std=0.3)
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([
        {"layer": 1, "component": "block_output", "positions": None, "intervention": iv}]))
    inputs = tok(["hello there", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reft_model(**inputs).logits
        base = reft_model.model(**inputs).logits
    assert not torch.allclose(expected, base)
    reft_model.save_pretrained(tmp_path)
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    loaded_iv = loaded.interventions["layer_1_block_output"]
    assert isinstance(loaded_iv, SteeringVectorIntervention) and loaded_iv.trainable is trainable
    assert torch.equal(loaded_iv.vector, iv.vector.detach())
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)  # same model, same vector, same arithmetic


def test_trains_like_any_intervention():
    """One optimizer step moves the vector along minus the gradient of the loss; the base stays frozen."""
    model, tok = tiny_model("llama"), tiny_tokenizer("llama")
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([
        {"layer": 2, "component": "block_output", "positions": "f2",
         "intervention": SteeringVectorIntervention()}]))
    iv = reft_model.interventions["layer_2_block_output"]
    inputs = tok(["hello"], return_tensors="pt")
    loss = reft_model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grad = iv.vector.grad.clone()
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    torch.optim.SGD(iv.parameters(), lr=0.1).step()
    torch.testing.assert_close(iv.vector.detach(), -0.1 * grad, rtol=0, atol=0)
