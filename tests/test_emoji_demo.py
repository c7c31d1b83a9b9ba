"""A shortened run of the main demo: training lowers the loss and steers answers toward emoji."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

pytestmark = pytest.mark.slow


def test_emoji_demo_learns():
    from emoji_chatbot import UNSEEN, is_emoji_only, run

    result = run(epochs=40, lr=1e-2, max_new_tokens=12, unseen=UNSEEN[:6], verbose=False)
    assert result.final_loss < 0.5 * result.first_loss
    assert result.steered_emoji_fraction >= result.base_emoji_fraction + 0.5
    assert result.reload_identical
    assert is_emoji_only("🤖💬 🌐") and not is_emoji_only("Hello 🤖")
