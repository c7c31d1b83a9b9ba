"""ReftConfig: JSON round trip and the clear errors for bad configs and inputs."""

import json

import pytest
import torch
from tiny_models import tiny_model

import reftlib
from reftlib import ReftConfig, ReftConfigError


def test_json_roundtrip_is_lossless():
    config = ReftConfig([
        {"layer": 3, "component": "block_output", "low_rank_dimension": 4, "positions": "f7+l7"},
        {"layer": 1, "component": "mlp_input", "intervention": "direft", "intervention_kwargs": {"low_rank_dimension": 2, "act_fn": "relu", "dropout": 0.05}},
        {"layer": 0, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[0, 5], num_heads=8, head_dim=4)},
        {"component": "model.layers.2.mlp:input", "intervention": reftlib.NoreftIntervention(low_rank_dimension=2, add_bias=True, dtype=torch.bfloat16)},
    ])
    text = config.to_json_string()
    again = ReftConfig.from_json_string(text)
    assert again.to_json_string() == text
    data = json.loads(text)
    assert data["representations"][1]["intervention"]["act_fn"] == "relu"
    assert data["representations"][1]["intervention"]["dropout"] == 0.05
    assert data["representations"][2]["intervention"]["heads"] == [0, 5]
    assert data["representations"][2]["unit"] == "h.pos"
    assert data["representations"][3]["intervention"]["dtype"] == "bfloat16"
    assert data["representations"][3]["intervention"]["add_bias"] is True


def test_pyreft_style_config_works():
    config = ReftConfig(representations={
        "layer": 1, "component": "block_output", "low_rank_dimension": 4,
        "intervention": reftlib.LoreftIntervention(embed_dim=32, low_rank_dimension=4)})
    reft_model = reftlib.get_reft_model(tiny_model("llama"), config)
    assert list(reft_model.interventions) == ["layer_1_block_output"]
    # intervention given as a name + rank
    config = ReftConfig({"layer": 1, "intervention_type": "LoreftIntervention", "low_rank_dimension": 2})
    assert isinstance(config.representations[0].intervention, reftlib.LoreftIntervention)


@pytest.mark.parametrize(
    "rep,message",
    [
        ({"layer": 1, "component": "residual"}, "unknown component 'residual'"),
        ({"layer": 1, "low_rank_dimension": 2, "colour": "red"}, r"unknown representation key\(s\) \['colour'\]"),
        ({"layer": "1", "low_rank_dimension": 2}, "layer must be an integer"),
        ({"layer": None, "low_rank_dimension": 2}, "layer must be an integer"),
        ({"layer": 1, "low_rank_dimension": 0}, "positive integer"),
        ({"layer": 1, "low_rank_dimension": -3}, "positive integer"),
        ({"layer": 1, "intervention": "magic", "low_rank_dimension": 2}, "unknown intervention type 'magic'"),
        ({"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2), "low_rank_dimension": 4}, "disagrees"),
        ({"layer": 1, "intervention": reftlib.HeadScaleIntervention()}, "needs component='head_output'"),
        ({"layer": 1, "unit": "token", "low_rank_dimension": 2}, "unit must be"),
        ({"layer": 1, "unit": "h.pos", "low_rank_dimension": 2}, "does not match"),
        ({"layer": 1, "positions": "last", "low_rank_dimension": 2}, "cannot parse position spec"),
        ({"layer": 1, "component": "model.layers.1.mlp", "low_rank_dimension": 2}, "drop layer=1"),
        ({"layer": 1, "max_number_of_units": 0, "low_rank_dimension": 2}, "max_number_of_units"),
        ({"layer": 1, "intervention": "loreft", "intervention_kwargs": {"rank": 2}}, "low_rank_dimension is required"),
        ({"layer": 1, "intervention": "noreft", "intervention_kwargs": {"low_rank_dimension": 2, "colour": 1}}, "unknown argument\\(s\\) \\['colour'\\] for NoreftIntervention"),
        ({"layer": 1, "low_rank_dimension": 2, "intervention_kwargs": {"dropout": 1.5}}, "dropout must be"),
        ({"layer": 1, "low_rank_dimension": 2, "intervention_kwargs": {"dtype": "int8"}}, "dtype 'int8' is not supported"),
    ],
)
def test_bad_representation(rep, message):
    with pytest.raises((ReftConfigError, reftlib.PositionError), match=message):
        ReftConfig(rep)


def test_bad_config_values():
    with pytest.raises(ReftConfigError, match="empty"):
        ReftConfig([])
    with pytest.raises(ReftConfigError, match="unknown ReftConfig argument"):
        ReftConfig({"layer": 1, "low_rank_dimension": 2}, colour="red")
    iv = reftlib.LoreftIntervention(low_rank_dimension=2)
    with pytest.raises(ReftConfigError, match="same intervention instance"):
        ReftConfig([{"layer": 1, "intervention": iv}, {"layer": 2, "intervention": iv}])
    with pytest.raises(ReftConfigError, match="not valid JSON"):
        ReftConfig.from_json_string('{"representations": [')
    with pytest.raises(ReftConfigError, match="newer reftlib"):
        ReftConfig.from_dict({"format": "reftlib", "format_version": 7, "representations": []})
    with pytest.raises(ReftConfigError, match="unknown ReftConfig key"):
        ReftConfig.from_dict({"representations": [{"layer": 1, "low_rank_dimension": 2}], "extra_stuff": 1})


@pytest.mark.parametrize(
    "rep,error,message",
    [
        ({"layer": 3, "low_rank_dimension": 2}, ReftConfigError, r"layer 3 does not exist.*3 layers \(valid 0..2\)"),
        ({"layer": -4, "low_rank_dimension": 2}, ReftConfigError, "layer -4 does not exist"),
        ({"layer": 0, "low_rank_dimension": 33}, ReftConfigError, "larger than the site's width 32"),
        ({"layer": 0, "intervention": reftlib.LoreftIntervention(embed_dim=64, low_rank_dimension=2)}, ReftConfigError, "embed_dim=64"),
        ({"component": "model.layers.9.mlp", "low_rank_dimension": 2}, ReftConfigError, "does not exist"),
        ({"component": "model.layers.0.mlp:middle", "low_rank_dimension": 2}, ReftConfigError, "':input' or ':output'"),
    ],
)
def test_attach_errors(rep, error, message):
    with pytest.raises(error, match=message):
        reftlib.get_reft_model(tiny_model("llama"), rep)


def test_unresolvable_architecture_names_the_fix():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "get_text_config": lambda self: self})()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    with pytest.raises(reftlib.ArchitectureError, match="pass a module path"):
        reftlib.resolve_site(Odd(), 0, "block_output")


def test_input_errors():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), {"layer": 1, "low_rank_dimension": 2})
    with pytest.raises(reftlib.InputError, match="empty"):
        reft_model(input_ids=torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(reftlib.InputError, match="add a batch dimension"):
        reft_model(input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(reftlib.InputError, match="does not match input_ids"):
        reft_model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(2, 3))
    with pytest.raises(reftlib.InputError, match="no source inputs"):
        reft_model({"input_ids": torch.tensor([[1, 2]])}, sources=[{"input_ids": torch.tensor([[1, 2]])}])
    with pytest.raises(reftlib.PositionError, match="not both"):
        reft_model(input_ids=torch.tensor([[1, 2]]), unit_locations="l1",
                   intervention_locations=torch.zeros(1, 1, 1, dtype=torch.long))


def test_intervention_on_another_device_than_its_layer():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), {"layer": 1, "low_rank_dimension": 2})
    reft_model.interventions["layer_1_block_output"].to("meta")  # a device the hidden states are not on
    with pytest.raises(reftlib.DeviceError, match=r"is on meta but model.layers.1 computes on cpu.*"
                                                  r"adapters\['default'\]\['layer_1_block_output'\].to\('cpu'\)"):
        reft_model(input_ids=torch.tensor([[1, 2, 3]]), unit_locations="l1")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequence_longer_than_the_model_allows(family):
    model = tiny_model(family)
    limit = model.config.max_position_embeddings if family == "llama" else model.config.n_positions
    reft_model = reftlib.get_reft_model(model, {"layer": 1, "low_rank_dimension": 2})
    too_long = torch.ones(1, limit + 1, dtype=torch.long)
    with pytest.raises(reftlib.InputError, match=rf"input has {limit + 1} tokens .* at most {limit}.*truncation=True"):
        reft_model(input_ids=too_long)
    with pytest.raises(reftlib.InputError, match=rf"prompt has {limit + 1} tokens .*max_length={limit}"):
        reft_model.generate(input_ids=too_long, max_new_tokens=1)
    assert reft_model(input_ids=too_long[:, :limit]).logits.shape[1] == limit  # the longest allowed input works


def test_nan_check_reports_the_intervention():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), {"layer": 1, "low_rank_dimension": 2})
    with torch.no_grad():
        reft_model.interventions["layer_1_block_output"].learned_source.bias.fill_(float("nan"))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(reftlib.NumericalError, match="layer_1_block_output.*model.layers.1"):
        reft_model(input_ids=ids, check_finite=True)
    assert torch.isnan(reft_model(input_ids=ids).logits).any()  # off by default: no per-call sync


def test_errors_share_a_base_class():
    for cls in [reftlib.ReftConfigError, reftlib.DeviceError, reftlib.PositionError, reftlib.ArchitectureError, reftlib.CheckpointError,
                reftlib.InputError, reftlib.AdapterError, reftlib.NumericalError]:
        assert issubclass(cls, reftlib.ReftError)
