"""save_pretrained / from_pretrained: safetensors + JSON, atomic, checked, Hub cache, push_to_hub."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import randomize
from tiny_models import tiny_model

import reftlib
from reftlib import io as reft_io

IDS = torch.tensor([[5, 9, 17, 33, 2, 41, 7]])


def _trained(family="llama", **rep):
    model = tiny_model(family)
    reps = rep.pop("reps", None) or [
        {"layer": 1, "component": "block_output", "intervention": reftlib.LoreftIntervention(low_rank_dimension=3, act_fn="gelu"), "positions": "l1"},
        {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1, 3])},
        {"layer": 0, "component": "mlp_output", "intervention": reftlib.NoreftIntervention(low_rank_dimension=2, add_bias=True, dtype="bfloat16")},
    ]
    reft_model = reftlib.get_reft_model(model, reps)
    randomize(reft_model)
    return reft_model


def _logits(reft_model):
    with torch.no_grad():
        return reft_model(input_ids=IDS).logits


def test_roundtrip_identical_outputs_and_config(tmp_path):
    reft_model = _trained()
    reference = _logits(reft_model)
    reft_model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["reft_config.json", "reft_model.safetensors"]
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), reference)
    saved = json.loads((tmp_path / "reft_config.json").read_text())
    assert saved["format"] == "reftlib" and saved["format_version"] == 2
    first = saved["representations"][0]
    assert first["intervention"] == {
        "type": "loreft", "embed_dim": 32, "dtype": "float32", "dropout": 0.0, "low_rank_dimension": 3, "act_fn": "gelu"
    }
    assert first["positions"] == "l1" and first["layer"] == 1 and first["component"] == "block_output"
    assert saved["representations"][1]["intervention"]["heads"] == [1, 3]
    assert saved["representations"][2]["intervention"]["dtype"] == "bfloat16"
    # dtype restored: the bf16 intervention is bf16 again, fp32 ones fp32
    ivs = loaded.interventions
    assert ivs["layer_0_mlp_output"].proj_layer.weight.dtype == torch.bfloat16
    assert ivs["layer_1_block_output"].learned_source.weight.dtype == torch.float32
    assert not loaded.training and not any(p.requires_grad for p in loaded.adapters.parameters())
    trainable = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"), is_trainable=True)
    assert all(p.requires_grad for p in trainable.adapters.parameters())


def test_rotation_stays_orthonormal_after_load(tmp_path):
    reft_model = _trained()
    reft_model.save_pretrained(tmp_path)
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    rot = loaded.interventions["layer_1_block_output"].rotate_layer.weight
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), atol=1e-5, rtol=0)


def test_no_square_matrix_in_the_file(tmp_path):
    reft_model = _trained()
    reft_model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "reft_model.safetensors"), "pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert shapes["layer_1_block_output.rotate_layer.raw"] == (32, 3)
    assert all(s != (32, 32) for s in shapes.values())


def test_safetensors_alone_is_enough(tmp_path):
    reft_model = _trained()
    reft_model.save_pretrained(tmp_path)
    (tmp_path / "reft_config.json").unlink()
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(reft_model))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _trained()
    first.save_pretrained(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    second = _trained()
    with torch.no_grad():
        for p in second.adapters.parameters():
            p.mul_(3)
    real_replace = os.replace

    def crash(src, dst):  # the process dies while the new weights are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(reft_io.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.setattr(reft_io.os, "replace", real_replace)
    after = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files left, old files intact
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(first))


def test_crash_between_weights_and_json_is_still_consistent(tmp_path, monkeypatch):
    first = _trained()
    first.save_pretrained(tmp_path)
    second = _trained()
    with torch.no_grad():
        for p in second.adapters.parameters():
            p.mul_(3)
    real = reft_io.atomic_write_bytes

    def write(path, data):
        if path.name == "reft_config.json":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(reft_io, "atomic_write_bytes", write)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(second))


def test_other_files_in_the_folder_are_untouched(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    _trained().save_pretrained(tmp_path)
    assert (tmp_path / "trainer_state.json").read_text() == "{}"


def test_truncated_and_corrupted_files(tmp_path):
    _trained().save_pretrained(tmp_path)
    weights = tmp_path / "reft_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(reftlib.CheckpointError, match="truncated or corrupted"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(reftlib.CheckpointError, match="truncated or corrupted"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def _rewrite_config(tmp_path, mutate):
    """Rewrite the config in both places (JSON and safetensors metadata)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((tmp_path / "reft_config.json").read_text())
    mutate(config)
    text = json.dumps(config)
    tensors = load_file(str(tmp_path / "reft_model.safetensors"))
    save_file(tensors, str(tmp_path / "reft_model.safetensors"), metadata={"format": "pt", "reftlib_config": text})
    (tmp_path / "reft_config.json").write_text(text)


def test_unknown_intervention_class_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c["representations"][0]["intervention"].update(type="os.system"))
    with pytest.raises(reftlib.CheckpointError, match="unknown intervention type 'os.system'"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def test_newer_format_version_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(format_version=99))
    with pytest.raises(reftlib.CheckpointError, match="newer reftlib"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def test_loading_onto_a_model_of_another_size(tmp_path):
    _trained().save_pretrained(tmp_path)
    import transformers

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64))
    with pytest.raises(reftlib.CheckpointError, match="do not fit this model.*width 48"):
        reftlib.ReftModel.from_pretrained(tmp_path, other)


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    _trained().save_pretrained(tmp_path)
    path = tmp_path / "reft_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors.pop("layer_1_block_output.learned_source.bias")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(reftlib.CheckpointError, match="missing"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(reftlib.CheckpointError, match="has no reft_model.safetensors"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    with pytest.raises(reftlib.CheckpointError, match="neither an existing folder nor a Hub repo"):
        reftlib.ReftModel.from_pretrained(str(tmp_path / "nope" / "deeper"), tiny_model("llama"))


def test_load_from_offline_hub_cache(tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache without network (HF_HUB_OFFLINE)."""
    reft_model = _trained()
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-reft"
    snapshot = repo / "snapshots" / revision
    reft_model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = reftlib.ReftModel.from_pretrained("someone/tiny-reft", tiny_model("llama"), cache_dir=str(tmp_path / "hub"))
    assert torch.equal(_logits(loaded), _logits(reft_model))
    with pytest.raises(reftlib.CheckpointError, match="could not be fetched"):
        reftlib.ReftModel.from_pretrained("someone/absent", tiny_model("llama"), cache_dir=str(tmp_path / "hub"))


def test_pyreft_style_aliases(tmp_path):
    reft_model = _trained()
    reft_model.save(tmp_path)
    loaded = reftlib.ReftModel.load(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(reft_model))


def test_push_to_hub_uploads_folder_with_model_card(tmp_path):
    reft_model = _trained()
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, folder_path, repo_id, commit_message, **kwargs):
            calls["files"] = sorted(os.listdir(folder_path))
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            calls["commit"] = commit_message
            return "ok"

    assert reft_model.push_to_hub("me/my-reft", api=FakeApi(), private=True) == "ok"
    assert calls["create"] == ("me/my-reft", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["files"] == ["README.md", "reft_config.json", "reft_model.safetensors"]
    assert "library_name: reftlib" in calls["card"] and "layer_1_block_output" in calls["card"]


def test_format_version_1_rotations_are_converted(tmp_path):
    """Version 1 stored rotations in the hidden state's basis; reading one gives the same R."""
    from safetensors.torch import load_file, save_file

    reft_model = _trained()
    rotation = reft_model.interventions["layer_1_block_output"].rotate_layer.weight.detach().clone()
    reference = _logits(reft_model)
    reft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "reft_config.json").read_text())
    config["format_version"] = 1
    tensors = load_file(str(tmp_path / "reft_model.safetensors"))
    key = "layer_1_block_output.rotate_layer.raw"
    assert not torch.allclose(tensors[key] / tensors[key].norm(dim=0), rotation.T, atol=1e-3)  # really another basis
    tensors[key] = (rotation.T * 0.7).contiguous()  # what version 1 wrote: R's rows as columns (any length)
    text = json.dumps(config)
    save_file(tensors, str(tmp_path / "reft_model.safetensors"), metadata={"format": "pt", "reftlib_config": text})
    (tmp_path / "reft_config.json").write_text(text)
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    torch.testing.assert_close(loaded.interventions["layer_1_block_output"].rotate_layer.weight, rotation,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(loaded), reference, atol=1e-5, rtol=1e-5)
