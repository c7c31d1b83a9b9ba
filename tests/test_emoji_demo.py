"""The main demo (``examples/emoji_chatbot.py``, run by ``make demo``) and its CLI config.

The slow test runs the demo with its own settings, so the tally it asserts is the one a newcomer
sees. Measured with seeds 42, 1 and 7, training on 1 or 2 threads (different kernels and reduction
orders, standing in for another CPU): 12 of 12 unseen prompts answered in emoji only every time, none
before training. The assertion asks for 10, leaving two prompts of margin for another CPU's last bits.
"""

import inspect
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

GUARANTEED_STEERED = 10  # of the 12 unseen prompts; see the module docstring


def test_demo_data_and_cli_config_agree():
    """``examples/configs/emoji.{yaml,jsonl}`` train what the script trains, with the same settings."""
    from emoji_chatbot import TRAIN, UNSEEN, is_emoji_only, run

    folder = ROOT / "examples" / "configs"
    config = yaml.safe_load((folder / "emoji.yaml").read_text(encoding="utf-8"))
    data, site, training = config["data"], config["intervention"], config["training"]
    lines = (folder / data["path"]).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert [(row[data["prompt_column"]], row[data["output_column"]]) for row in rows] == TRAIN
    defaults = {name: p.default for name, p in inspect.signature(run).parameters.items()}
    assert site["layers"] == defaults["layer"] and site["rank"] == defaults["rank"] and site["positions"] == "l1"
    assert training["epochs"] == defaults["epochs"] and float(training["learning_rate"]) == defaults["lr"]
    assert training["batch_size"] == len(TRAIN) and training["seed"] == defaults["seed"]
    assert all(is_emoji_only(answer) for _, answer in TRAIN)
    assert not {question for question, _ in TRAIN} & set(UNSEEN), "the unseen prompts must stay unseen"
    assert len(UNSEEN) == 12


def test_is_emoji_only():
    from emoji_chatbot import is_emoji_only

    assert is_emoji_only("🤖💬 🌐") and is_emoji_only("🚶‍♀️➡️🚉🗺️") and is_emoji_only("🇫🇷")
    assert not is_emoji_only("Hello 🤖") and not is_emoji_only("") and not is_emoji_only("🤖�")


@pytest.mark.slow
def test_emoji_demo_steers_unseen_prompts():
    """The full demo: no unseen prompt in emoji only before training, at least 10 of 12 after."""
    from emoji_chatbot import UNSEEN, run

    result = run(verbose=False)
    assert result.base_emoji_count == 0, result.base_answers
    assert result.steered_emoji_count >= GUARANTEED_STEERED, result.steered_answers
    assert result.final_loss < 0.5 * result.first_loss
    assert result.reload_identical
    assert result.tally() == (f"steered: {result.steered_emoji_count} of {len(UNSEEN)} unseen prompts answered "
                              f"in emoji only (base: 0)")
