"""One LoFiT pipeline per task (reftlib.lofit.run_lofit_task, ``reftlib lofit``): files, reload, ablation heads, errors.

Runs on a tiny random Llama saved to a folder (loaded by path, as a user's model would be) and a
handful of rows of each dataset read from the shared data folder; skipped when that folder is absent.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny_models import tiny_config
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM

from reftlib import ReftModel
from reftlib.cli import LOFIT_TASKS, main
from reftlib.errors import ReftConfigError, ReftError
from reftlib.evaluation import find_data_dir
from reftlib.io import holds_adapters
from reftlib.lofit import (
    TASKS,
    HeadSelection,
    evaluate_task,
    load_task_data,
    mean_and_stderr,
    random_head_selection,
    resolve_heads_from,
    run_lofit_task,
)

try:
    DATA = find_data_dir()
except ReftError:  # pragma: no cover - depends on the machine
    DATA = None
pytestmark = pytest.mark.skipif(DATA is None, reason="benchmark data folder (../shared/data) not found")

# 3 layers x 4 heads of dimension 8: 3 heads = 0.25 of them, 24 offset parameters.
FAST = dict(max_train=4, max_eval=4, epochs=1, select_epochs=1, batch_size=4, heads=0.25, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (prompts of CLUTRR need ~400 positions) and its tokenizer, saved as a folder."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.max_position_embeddings = 1024
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tiny_tokenizer("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """One full run per task, written to its own folder."""
    out = {}
    for task in TASKS:
        folder = tmp_path_factory.mktemp(f"lofit-{task}")
        out[task] = (folder, run_lofit_task(task, model=model_dir, data_dir=DATA, output_dir=folder, **FAST))
    return out


def load_tiny(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    return model, tiny_tokenizer("llama")


@pytest.mark.parametrize("task", TASKS)
def test_each_task_runs_end_to_end_and_writes_its_files(runs, task):
    folder, result = runs[task]
    assert holds_adapters(folder)
    for name in ("head_selection.json", "results.json", "results.md"):
        assert (folder / name).is_file(), name
    if importlib.util.find_spec("matplotlib") is not None:
        assert (folder / "heads.png").stat().st_size > 0
    saved = json.loads((folder / "results.json").read_text())
    assert saved["metrics"] == result["metrics"]
    expected = {"truthfulqa": {"mc1", "mc2"}, "clutrr": {"exact_match"}, "mquake": {"exact_match"}}[task]
    assert set(result["metrics"]) == expected
    for metric in result["metrics"].values():
        assert metric["n"] == 4 and 0 <= metric["value"] <= 1 and metric["stderr"] is not None
    assert result["heads"]["source"] == "selected" and result["heads"]["k"] == 3
    assert result["trainable_parameters"] == 3 * 8
    assert result["data"]["n_train"] == 4
    assert {"select_s", "offsets_s", "eval_s", "total_s"} <= set(result["timing"])
    assert HeadSelection.load(folder).heads == [tuple(h) for h in result["heads"]["selected"]]
    assert "± " in (folder / "results.md").read_text()


@pytest.mark.parametrize("task", TASKS)
def test_saved_adapter_reloads_with_identical_outputs(runs, model_dir, task):
    folder, result = runs[task]
    model, tok = load_tiny(model_dir)
    ids = tok(["Q: Why?\nA: Because"], return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**ids).logits
    reft_model = ReftModel.from_pretrained(folder, model)
    rows = load_task_data(task, DATA, max_train=4, max_eval=4).eval_rows
    again = evaluate_task(task, reft_model, tok, rows, progress=False)
    assert again["per_example"] == result["per_example"]  # same predictions / same MC scores, bit for bit
    assert again["metrics"] == result["metrics"]
    with torch.no_grad():
        assert not torch.equal(reft_model(**ids).logits, base_logits)  # the offsets do act
    heads = sorted((layer, h) for rep in reft_model.reft_configs["default"].representations
                   for layer, h in [(rep.layer, h) for h in rep.intervention.heads])
    assert heads == sorted(tuple(h) for h in result["heads"]["selected"])


def test_a_model_instance_is_left_without_hooks(model_dir, tmp_path):
    model, tok = load_tiny(model_dir)
    ids = tok(["Read the story."], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    run_lofit_task("clutrr", model=model, tokenizer=tok, data_dir=DATA, random_heads=True, **FAST)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, before)


def test_heads_from_uses_the_other_runs_heads(runs, model_dir):
    tqa_folder, tqa = runs["truthfulqa"]
    result = run_lofit_task("clutrr", model=model_dir, data_dir=DATA, heads_from=tqa_folder, **FAST)
    assert result["heads"]["selected"] == tqa["heads"]["selected"]
    assert result["heads"]["source"].startswith("heads_from:")
    assert result["timing"]["select_s"] < runs["clutrr"][1]["timing"]["select_s"]  # no step 1
    # another count from the same ranking: its top heads, best first
    model, _ = load_tiny(model_dir)
    assert resolve_heads_from(tqa_folder, model, 2).heads == [tuple(h) for h in tqa["heads"]["selected"][:2]]


def test_heads_from_a_model_of_another_shape_is_refused(model_dir):
    model, _ = load_tiny(model_dir)
    other = HeadSelection(torch.rand(5, 4), 2)
    with pytest.raises(ReftConfigError, match="5 layers x 4 heads.*3 x 4"):
        resolve_heads_from(other, model, 2)


def test_random_heads_are_seeded_reproducible_and_of_the_same_count(runs, model_dir):
    model, _ = load_tiny(model_dir)
    first = random_head_selection(model, 0.25, seed=7)
    assert first.heads == random_head_selection(model, 0.25, seed=7).heads
    assert first.k == 3 == runs["truthfulqa"][1]["heads"]["k"]
    draws = {tuple(random_head_selection(model, 0.25, seed=s).heads) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    assert all(len(set(d)) == 3 for d in draws)  # without repetition
    result = run_lofit_task("clutrr", model=model_dir, data_dir=DATA, random_heads=True, seed=7, **FAST)
    assert result["heads"]["selected"] == [list(h) for h in first.heads]
    assert result["heads"]["source"] == "random(seed=7)"


def test_mean_and_stderr_follow_the_sample_formula():
    out = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert out["value"] == 0.75
    assert out["stderr"] == pytest.approx((0.25 / 4) ** 0.5, rel=1e-12)  # sample var 0.25, n 4
    assert mean_and_stderr([0.5])["stderr"] is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"task": "squad"}, "unknown LoFiT task 'squad'.*truthfulqa, clutrr, mquake"),
    ({"heads": 0}, "heads must be"),
    ({"heads": 1.5}, "heads must be"),
    ({"heads": True}, "heads must be"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"heads_from": "x", "random_heads": True}, "not both"),
    ({"max_train": 0}, "max_train must be"),
    ({"eval_split": "train"}, "eval_split must be"),
])
def test_bad_arguments_raise_config_errors(model_dir, kwargs, match):
    args = {"task": "clutrr", "model": model_dir, "data_dir": DATA, **kwargs}
    with pytest.raises(ReftConfigError, match=match):
        run_lofit_task(args.pop("task"), **args)


def test_missing_data_names_the_expected_files(tmp_path):
    (tmp_path / "truthfulqa").mkdir()
    with pytest.raises(ReftConfigError, match=r"missing truthfulqa/fold_0_train_seed_42\.csv"):
        run_lofit_task("truthfulqa", data_dir=tmp_path)
    with pytest.raises(ReftConfigError, match=r"mquake/train\.jsonl"):
        run_lofit_task("mquake", data_dir=tmp_path / "nowhere")


def test_cli_runs_a_task_and_prints_the_metrics(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["lofit", "mquake", "--model", str(model_dir), "--data", str(DATA), "--output-dir", str(out),
                 "--max-train", "4", "--max-eval", "4", "--epochs", "1", "--batch-size", "4", "--heads", "2",
                 "--random-heads", "--seed", "3", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "exact_match" in printed and "2 heads" in printed and "random(seed=3)" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["heads"]["k"] == 2 and saved["hyperparameters"]["epochs"] == 1
    assert holds_adapters(out)


def test_cli_errors(tmp_path, capsys):
    assert LOFIT_TASKS == TASKS
    assert main(["lofit", "squad"]) == 2
    assert "invalid choice: 'squad'" in capsys.readouterr().err
    assert main(["lofit", "clutrr", "--data", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "reftlib lofit: error:" in err and "clutrr/train.json" in err and "Traceback" not in err
    assert main(["lofit", "clutrr", "--heads-from", "x", "--random-heads"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["lofit", "clutrr", "--heads", "many"]) == 2
    assert main(["lofit", "--help"]) == 0
    assert "--heads-from" in capsys.readouterr().out
