"""The method contract: configs are data, models own their interventions, the post-step hook, merging,
and the call plan that every runtime executes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

import reftlib
from reftlib import ReftConfig
from reftlib.errors import MergeError, PositionError, ReftConfigError, ReftError
from reftlib.plan import build_plan, mask_from_lengths

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def loreft(layer: int = 1, **extra) -> dict:
    return {"layer": layer, "component": "block_output", "positions": "l1",
            "intervention": reftlib.LoreftIntervention(low_rank_dimension=2), **extra}


# ---------------------------------------------------------------- configs are data
def test_one_config_on_two_models_shares_no_parameters():
    config = ReftConfig(loreft())
    before = config.to_json_string()
    first = reftlib.get_reft_model(tiny_model("llama"), config)
    second = reftlib.get_reft_model(tiny_model("llama"), config)
    ours = dict(first.adapters.named_parameters())
    theirs = dict(second.adapters.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is not theirs[k] and ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)
    with torch.no_grad():
        for p in first.adapters.parameters():
            p.add_(1.0)
    assert not any(torch.equal(ours[k], theirs[k]) for k in ours)
    # nothing written back into the caller's config
    assert config.to_json_string() == before
    assert config.representations[0].name is None and config.base_model_type is None
    assert first.reft_config is not config and first.reft_config.representations[0].name == "layer_1_block_output"


def test_pyreft_style_instance_is_adopted_by_the_first_model_only():
    iv = reftlib.LoreftIntervention(low_rank_dimension=2)
    config = ReftConfig({"layer": 1, "component": "block_output", "intervention": iv})
    first = reftlib.get_reft_model(tiny_model("llama"), config)
    assert first.interventions["layer_1_block_output"] is iv  # the caller's handle stays live
    with torch.no_grad():  # values computed into the instance (ITI-style) travel with it
        iv.learned_source.bias.fill_(0.25)
    second = reftlib.get_reft_model(tiny_model("llama"), config)
    other = second.interventions["layer_1_block_output"]
    assert other is not iv and type(other) is type(iv) and other.config == iv.config
    assert not ({id(p) for p in iv.parameters()} & {id(p) for p in other.parameters()})
    assert all(torch.equal(a, b) for a, b in zip(iv.state_dict().values(), other.state_dict().values()))
    with torch.no_grad():
        other.learned_source.bias.fill_(-1.0)
    assert float(iv.learned_source.bias[0]) == 0.25
    # built from a type name: every model starts from its own fresh initialization
    by_name = ReftConfig({"layer": 1, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2})
    a = reftlib.get_reft_model(tiny_model("llama"), by_name).interventions["layer_1_block_output"]
    b = reftlib.get_reft_model(tiny_model("llama"), by_name).interventions["layer_1_block_output"]
    assert not ({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})


def test_config_save_and_load(tmp_path):
    config = ReftConfig([loreft(1), {"layer": 0, "component": "head_output", "positions": None,
                                     "intervention": reftlib.HeadBiasIntervention(heads=[1, 3])}])
    path = config.save_pretrained(tmp_path / "cfg")
    assert path.name == "reft_config.json" and json.loads(path.read_text())["format"] == "reftlib"
    loaded = ReftConfig.from_pretrained(tmp_path / "cfg")
    assert loaded.to_dict() == config.to_dict()
    assert loaded.representations[1].intervention.heads == [1, 3]
    # a folder written by ReftModel.save_pretrained holds the same file
    reft_model = reftlib.get_reft_model(tiny_model("llama"), config)
    reft_model.save_pretrained(tmp_path / "model")
    assert ReftConfig.from_pretrained(tmp_path / "model").to_dict() == reft_model.reft_config.to_dict()
    (tmp_path / "bad.json").write_text('{"format": "reftlib", "representations": [')
    with pytest.raises(ReftConfigError, match="not valid JSON"):
        ReftConfig.from_pretrained(tmp_path / "bad.json")
    with pytest.raises(ReftConfigError, match="does not exist"):
        ReftConfig.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------- arguments at the door
@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M", None, nn.Linear(2, 2)])
def test_get_reft_model_rejects_what_is_not_a_model(model):
    with pytest.raises(ReftError, match="expects"):
        reftlib.get_reft_model(model, ReftConfig(loreft()))


@pytest.mark.parametrize("config", [42, "loreft", None])
def test_get_reft_model_rejects_what_is_not_a_config(config):
    with pytest.raises(ReftConfigError, match="expects a ReftConfig"):
        reftlib.get_reft_model(tiny_model("llama"), config)
    reft_model = reftlib.get_reft_model(tiny_model("llama"), ReftConfig(loreft()))
    with pytest.raises(ReftConfigError, match="expects a ReftConfig"):
        reft_model.add_adapter("other", config)


# ---------------------------------------------------------------- the post-optimizer-step hook
@reftlib.register_intervention("unit_steer_for_tests")
class UnitSteer(reftlib.Intervention):
    """A direction kept at unit length by ``after_optimizer_step``."""

    def build_parameters(self):
        self.direction = nn.Parameter(torch.ones(self.embed_dim) / self.embed_dim**0.5)
        self.calls = 0

    def edit(self, h):
        return self.direction.expand_as(h)

    def after_optimizer_step(self):
        self.calls += 1
        with torch.no_grad():
            self.direction /= self.direction.norm()


def test_after_optimizer_step_runs_for_updated_interventions_only():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), ReftConfig([
        {"layer": 0, "component": "block_output", "intervention": UnitSteer()},
        {"layer": 2, "component": "block_output", "intervention": UnitSteer()},
    ]))
    trained, untouched = reft_model.interventions["layer_0_block_output"], reft_model.interventions["layer_2_block_output"]
    optimizer = torch.optim.SGD([trained.direction], lr=0.5)  # a hand-written loop, no Trainer
    for _ in range(3):
        optimizer.zero_grad()
        reft_model(input_ids=IDS).logits.square().mean().backward()
        optimizer.step()
    assert trained.calls == 3 and untouched.calls == 0
    # fp32 norm of a 32-vector after one division: within a few ulps of 1
    assert abs(float(trained.direction.detach().norm()) - 1.0) < 32 * torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- merging
def _lofit_stack(dtype=torch.float64) -> reftlib.ReftModel:
    model = tiny_model("llama", dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    reft_model = reftlib.get_reft_model(model, ReftConfig([
        {"layer": 1, "component": "head_output", "intervention": reftlib.HeadScaleIntervention(dtype=name)},
        {"layer": 1, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[0, 2], dtype=name)},
        {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[3], dtype=name)},
    ]))
    with torch.no_grad():
        for p in reft_model.adapters.parameters():
            p.normal_(0, 0.5)
    return reft_model


def test_merge_and_unload_folds_lofit_exactly():
    reft_model = _lofit_stack()
    with torch.no_grad():
        expected = reft_model(input_ids=IDS).logits
        merged = reft_model.merge_and_unload()
        got = merged(input_ids=IDS).logits
    assert not isinstance(merged, reftlib.ReftModel)
    # float64 throughout: folding reassociates a few sums, errors ~1e-15 relative
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_merge_names_every_intervention_that_cannot_fold_and_changes_nothing():
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, ReftConfig([
        {"layer": 0, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1])},
        loreft(1),
        {"layer": 2, "component": "block_output", "intervention": reftlib.DireftIntervention(low_rank_dimension=2)},
    ]))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError) as info:
        reft_model.merge_and_unload()
    message = str(info.value)
    assert "layer_1_block_output" in message and "LoreftIntervention" in message
    assert "layer_2_block_output" in message and "DireftIntervention" in message
    assert "layer_0_head_output" not in message
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    reft_model(input_ids=IDS)  # still a working ReftModel


# ---------------------------------------------------------------- the call plan
def test_collator_positions_plan_equals_unit_locations_plan():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), ReftConfig([loreft(0), loreft(2)]))
    mask = torch.ones(2, 6, dtype=torch.long)
    locations = torch.tensor([[[1, 5], [0, -1]], [[2, 3], [4, 5]]])  # [batch, interventions, positions]
    direct = reft_model.plan_call(mask, intervention_locations=locations)
    via_dict = reft_model.plan_call(mask, unit_locations={"sources->base": (None, locations.permute(1, 0, 2))})
    assert direct.positions.keys() == via_dict.positions.keys()
    assert all(torch.equal(direct.positions[k], via_dict.positions[k]) for k in direct.positions)
    with torch.no_grad():
        a = reft_model(input_ids=IDS, intervention_locations=locations).logits
        b = reft_model(input_ids=IDS, unit_locations={"sources->base": (None, locations.permute(1, 0, 2))}).logits
    assert torch.equal(a, b)
    with pytest.raises(PositionError, match="the call has 2"):
        reft_model.plan_call(mask, intervention_locations=locations[:, :1])
    with pytest.raises(PositionError, match="not both"):
        reft_model.plan_call(mask, intervention_locations=locations, unit_locations="l1")


def test_plan_is_immutable_and_flat_positions_index_a_flat_batch():
    specs = {"a": [("x", "f1+l1")], "b": [("y", "l2")]}
    lengths = [3, 5, 2]
    plan = build_plan(specs, ["a"], mask_from_lengths(lengths), adapter_names=["a", ["a", "b"], None])
    assert plan.adapters == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.prompt_length = 0  # frozen
    with pytest.raises(TypeError):
        plan.positions["a.x"] = None  # read-only mapping
    starts = [0, 3, 8]  # rows concatenated: [0..2], [3..7], [8..9]
    # a.x: first and last token of rows 0 and 1; row 2 has no adapter
    assert plan.flat_positions("a.x", starts).tolist() == [0, 2, 3, 7]
    # b.y: last two tokens of row 1 only
    assert plan.flat_positions("b.y", starts).tolist() == [6, 7]


# ---------------------------------------------------------------- pyreft state, per method
def test_each_method_reads_its_own_pyreft_state():
    from reftlib.errors import CheckpointError

    d, r = 8, 2
    rotation = torch.linalg.qr(torch.randn(d, r))[0]  # pyreft's R: [d, r], orthonormal columns
    state = {"rotate_layer": rotation, "weight": torch.randn(r, d), "bias": torch.randn(r), "embed_dim": torch.tensor(d)}
    params, arguments, used = reftlib.LoreftIntervention.from_pyreft_state(state, "intkey_x.bin")
    assert arguments == {"embed_dim": d, "low_rank_dimension": r, "act_fn": "linear"}
    assert set(params) == {"rotate_layer.raw", "learned_source.weight", "learned_source.bias"}
    assert {"rotate_layer", "weight", "bias"} <= used
    iv = reftlib.LoreftIntervention(**arguments)
    iv.load_state_dict(params)
    torch.testing.assert_close(iv.rotate_layer.weight, rotation.T, atol=1e-6, rtol=0)  # unit-norm rows
    with pytest.raises(CheckpointError, match="no pyreft counterpart"):
        reftlib.HeadBiasIntervention.from_pyreft_state(state, "intkey_x.bin")
    with pytest.raises(CheckpointError, match="lacks tensor 'learned_source'"):
        reftlib.ConsreftIntervention.from_pyreft_state({"rotate_layer": rotation}, "intkey_x.bin")


def test_copied_interventions_keep_the_post_step_hook():
    """A second model's copy of an instance (and a deepcopy) is retracted after optimizer steps like the original."""
    from reftlib.interventions.rotation import INIT_COLUMN_NORM

    iv = reftlib.LoreftIntervention(low_rank_dimension=2)
    config = ReftConfig({"layer": 1, "component": "block_output", "intervention": iv})
    reftlib.get_reft_model(tiny_model("llama"), config)
    second = reftlib.get_reft_model(tiny_model("llama"), config)
    copy = second.interventions["layer_1_block_output"]
    optimizer = torch.optim.SGD(copy.parameters(), lr=5.0)  # a large step: columns leave length 1/2 unless retracted
    optimizer.zero_grad()
    second(input_ids=IDS).logits.square().mean().backward()
    optimizer.step()
    norms = copy.rotate_layer.raw.detach().norm(dim=0)
    torch.testing.assert_close(norms, torch.full_like(norms, INIT_COLUMN_NORM), rtol=1e-5, atol=0)


def test_add_adapter_with_a_list_leaves_the_callers_representations_alone():
    rep = reftlib.RepresentationConfig(layer=1, component="block_output",
                                       intervention=reftlib.LoreftIntervention(low_rank_dimension=2))
    first = reftlib.ReftModel(tiny_model("llama"), [rep])
    second = reftlib.ReftModel(tiny_model("llama"), [rep])
    assert rep.name is None and not rep.bound
    own = first.reft_configs["default"].representations[0]
    assert own is not rep and own.intervention is first.interventions["layer_1_block_output"]
    assert second.interventions["layer_1_block_output"] is not own.intervention


def test_merge_refuses_an_adapter_named_twice():
    reft_model = _lofit_stack()
    with pytest.raises(reftlib.AdapterError, match="twice"):
        reft_model.merge_and_unload(["default", "default"])
