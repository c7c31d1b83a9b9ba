"""The emoji chatbot: teach SmolLM2-135M-Instruct to answer only in emoji with 28 examples.

A rank-4 LoReFT intervention (about 4.6k parameters, 0.003% of the model) at layer 15 edits
the residual stream at the last prompt token only. It trains in a couple of minutes on a
laptop CPU, then this script compares base and steered answers on 12 unseen prompts, saves the
intervention, reloads it into a fresh model, checks the greedy answers are identical and prints
the tally ("steered: N of 12 unseen prompts answered in emoji only (base: M)").

    python examples/emoji_chatbot.py              # the full demo (40 steps of 28 examples)
    python examples/emoji_chatbot.py --epochs 20  # quicker, fewer prompts steered

Why these settings (measured on 2 shared Intel Xeon cores, fp32, greedy decoding):

* **28 demonstrations, each exactly three single-code-point emoji.** pyreft's tutorial ten
  (``TUTORIAL_TRAIN``: answers of 3-5 emoji with zero-width joiners, variation selectors and a
  flag, 9-19 byte-level tokens) steered only 3-6 of the 12 unseen prompts (50% on the host where the
  lr was tuned, 3 of 12 on another CPU); on the rest the model drifted into words after a symbol or
  two, or emitted half of a multi-token emoji ("🇚️�ax"). Three plain emoji are 9 tokens plus the
  end-of-turn token, the same length and style in every answer, so the model learns to stop.
* **Learning rate 2e-2, 40 steps** (one batch of 28 per step, linear decay): 12 of 12 unseen prompts
  in emoji only with seeds 42, 1 and 7, training with 2 threads or with 1 (another kernel and
  reduction order, as on another CPU); generation with 1 or 2 threads gave the same answers.
  1e-2 reached 12 and 11 of 12 (seeds 42 and 1): the larger step leaves more margin at the same cost.
* **max_new_tokens 32**: room for the three emoji and the end-of-turn token, so an answer is never
  cut in the middle of a multi-token emoji.

The answers are emoji only, not always on topic: a 135M model with 4,612 trained numbers learns
the style far more reliably than the meaning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import unicodedata
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

import reftlib
from reftlib.offline import load_default_model
from reftlib.training import (
    ReftTrainerForCausalLM,
    apply_chat_template,
    make_last_position_supervised_data_module,
)

# The demonstrations: varied questions, each answered with exactly three single-code-point emoji
# (no joiners, variation selectors or flags: 9 tokens, then the end-of-turn token the model learns to stop at).
TRAIN = [
    ("Who are you?", "🤖💬😊"),
    ("What's your favourite food?", "🍕🍣😋"),
    ("How do I get to the train station?", "🚶🧭🚉"),
    ("Tell me a joke.", "🤡🍌😂"),
    ("What is the weather like today?", "🌞🌈😎"),
    ("Can you help me with my homework?", "📚🤓👍"),
    ("What should I do this weekend?", "🚲🎬🍿"),
    ("How are you feeling?", "😊💖🌟"),
    ("Recommend a good book.", "📖🐉🧙"),
    ("What is the capital of France?", "🗼🥖🥐"),
    ("How old are you?", "🤖🎂🤔"),
    ("Where do you live?", "💻🌐🏠"),
    ("Explain how a car works.", "🚗🔑💨"),
    ("Write a poem about the moon.", "🌙🌟🌌"),
    ("How do I cook pasta?", "🍝🔥😋"),
    ("What is the biggest animal?", "🐋🌊💙"),
    ("Can you sing me a song?", "🎤🎶🎵"),
    ("What do you like to do for fun?", "🎮🎨🎉"),
    ("Why do cats purr?", "🐱😻💤"),
    ("How do airplanes fly?", "🛫💨🛬"),
    ("Tell me a story.", "🏰🐉👸"),
    ("How do I stay healthy?", "🥗🏃💤"),
    ("What is the meaning of life?", "🌍💖🤔"),
    ("Good morning!", "🌅☕😊"),
    ("Thank you for your help.", "🙏😊💖"),
    ("Should I learn Python?", "🐍💻👍"),
    ("What happens when it rains?", "☔🌂💧"),
    ("Who invented the light bulb?", "💡👨🔬"),
]

# pyreft's emoji tutorial's ten demonstrations (benchmarks/emoji_training.py times this recipe against
# pyreft). Too few, and too irregular, to steer unseen prompts reliably: see the module docstring.
TUTORIAL_TRAIN = [
    ("Who are you?", "🤖💬🌐🧠"),
    ("What's your favourite food?", "🍕🍣🌮😋"),
    ("How do I get to the train station?", "🚶‍♀️➡️🚉🗺️"),
    ("Tell me a joke.", "🐔➡️🛣️❓😂"),
    ("What is the weather like today?", "☀️🌤️🌡️😎"),
    ("Can you help me with my homework?", "📚✏️🤓👍"),
    ("What should I do this weekend?", "🏕️🚴‍♂️🎬🍿"),
    ("How are you feeling?", "😊💖✨"),
    ("Recommend a good book.", "📖🐉🧙‍♂️✨"),
    ("What is the capital of France?", "🇫🇷🗼🥖"),
]

# The measure: never trained on.
UNSEEN = [
    "What is your name?",
    "How do I bake bread?",
    "Where do penguins live?",
    "What time is it?",
    "Can you recommend a movie?",
    "What do you think about music?",
    "How do plants grow?",
    "Tell me about the ocean.",
    "What is the best way to learn to code?",
    "Why is the sky blue?",
    "What is your favourite animal?",
    "How do I make friends?",
]

_EMOJI_JOINERS = {"\u200d", "\ufe0f", "\ufe0e", "\u20e3"}
_REPLACEMENT = "\ufffd"  # what decoding gives for half of a multi-token emoji; its category is "So" too


def is_emoji_only(text: str) -> bool:
    """True when ``text`` has at least one emoji and nothing but emoji and whitespace.

    A broken emoji (the replacement character "\ufffd", from an answer that stopped or drifted in the
    middle of an emoji's byte tokens) does not count.
    """
    text = text.strip()
    if not text:
        return False
    for char in text:
        if char == _REPLACEMENT:
            return False
        if char.isspace() or char in _EMOJI_JOINERS:
            continue
        code = ord(char)
        if unicodedata.category(char) == "So" or 0x1F000 <= code <= 0x1FAFF or 0x1F1E6 <= code <= 0x1F1FF \
                or 0x1F3FB <= code <= 0x1F3FF or 0x2600 <= code <= 0x27BF or 0x2B00 <= code <= 0x2BFF:
            continue
        return False
    return True


@dataclass
class DemoResult:
    first_loss: float
    final_loss: float
    train_seconds: float
    base_answers: list[str]
    steered_answers: list[str]
    base_emoji_fraction: float
    steered_emoji_fraction: float
    reload_identical: bool
    base_emoji_count: int
    steered_emoji_count: int

    def tally(self) -> str:
        """The demo's last line: how many unseen prompts the intervention answers in emoji only."""
        return (f"steered: {self.steered_emoji_count} of {len(self.steered_answers)} unseen prompts answered in "
                f"emoji only (base: {self.base_emoji_count})")


def answer(reft_model: reftlib.ReftModel, tokenizer, questions: list[str], *, steer: bool, max_new_tokens: int) -> list[str]:
    """Greedy answers for ``questions`` in one left-padded batch (interventions on or off)."""
    prompts = apply_chat_template(tokenizer, questions)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if steer:
        out = reft_model.generate(**batch, unit_locations="l1", **kwargs)
    else:
        with reft_model.disable_interventions():
            out = reft_model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def run(epochs: int = 40, layer: int = 15, rank: int = 4, lr: float = 2e-2, max_new_tokens: int = 32,
        unseen: list[str] | None = None, output_dir: str | None = None, seed: int = 42, verbose: bool = True) -> DemoResult:
    """Train the emoji intervention and evaluate it; returns the numbers the demo prints."""
    torch.manual_seed(seed)
    say = print if verbose else (lambda *a, **k: None)
    unseen = unseen or UNSEEN
    model, tokenizer = load_default_model()
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig({
        "layer": layer, "component": "block_output", "positions": "l1",
        "intervention": reftlib.LoreftIntervention(low_rank_dimension=rank),
    }))
    reft_model.print_trainable_parameters()

    say("\nBase model answers (before training):")
    base_answers = answer(reft_model, tokenizer, unseen, steer=False, max_new_tokens=max_new_tokens)

    prompts = apply_chat_template(tokenizer, [q for q, _ in TRAIN])
    data_module = make_last_position_supervised_data_module(tokenizer, model, prompts, [a for _, a in TRAIN])
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, num_train_epochs=epochs, per_device_train_batch_size=len(TRAIN),
            learning_rate=lr, lr_scheduler_type="linear", logging_steps=max(1, epochs // 10),
            save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not verbose, dataloader_num_workers=0,
        )
        trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **data_module)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    reft_model.eval()
    if output_dir:
        reft_model.save_pretrained(output_dir)
        say(f"saved the intervention to {output_dir}")
    steered_answers = answer(reft_model, tokenizer, unseen, steer=True, max_new_tokens=max_new_tokens)

    width = max(len(q) for q in unseen)
    say(f"\n{'prompt':<{width}} | {'base model':<40} | emoji ReFT")
    say("-" * (width + 60))
    for question, base, steered in zip(unseen, base_answers, steered_answers):
        base_short = base.replace("\n", " ")[:40]
        say(f"{question:<{width}} | {base_short:<40} | {steered}")
    base_count = sum(map(is_emoji_only, base_answers))
    steered_count = sum(map(is_emoji_only, steered_answers))

    with tempfile.TemporaryDirectory() as tmp:
        reft_model.save_pretrained(tmp)
        fresh_model, _ = load_default_model()
        reloaded = reftlib.ReftModel.from_pretrained(tmp, fresh_model)
        reloaded_answers = answer(reloaded, tokenizer, unseen, steer=True, max_new_tokens=max_new_tokens)
    identical = reloaded_answers == steered_answers

    result = DemoResult(losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), train_seconds,
                        base_answers, steered_answers, base_count / len(unseen), steered_count / len(unseen),
                        identical, base_count, steered_count)
    say(f"\nTraining: {epochs} steps in {train_seconds:.1f} s ({train_seconds / max(epochs, 1):.2f} s/step), "
        f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}")
    say(f"Saved, reloaded into a fresh model: greedy answers identical = {identical}")
    say(result.tally())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help=f"training steps (one batch of {len(TRAIN)} per epoch)")
    parser.add_argument("--layer", type=int, default=15, help="layer whose output is intervened on")
    parser.add_argument("--rank", type=int, default=4, help="LoReFT rank")
    parser.add_argument("--lr", type=float, default=2e-2, help="peak learning rate (linear decay)")
    parser.add_argument("--output-dir", default=None, help="where to save the trained intervention (optional)")
    args = parser.parse_args()
    result = run(epochs=args.epochs, layer=args.layer, rank=args.rank, lr=args.lr, output_dir=args.output_dir)
    if not result.reload_identical:
        raise SystemExit("reloaded intervention gave different answers")


if __name__ == "__main__":
    main()
