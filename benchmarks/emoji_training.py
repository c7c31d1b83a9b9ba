"""End-to-end training time of the emoji tutorial: reftlib's Trainer vs the raw step vs pyreft's Trainer.

The recipe is pyreft's emoji tutorial (the demo ``examples/emoji_chatbot.py`` trains on a larger set):
the 10 ``TUTORIAL_TRAIN`` examples of that script, one batch of 10 per step, 100 epochs (= 100 steps), rank-4
LoReFT on the block output of layer 15 of SmolLM2-135M-Instruct at the last prompt token,
AdamW lr 4e-3 with linear decay. ``--template tutorial`` (default) formats the prompts with
pyreft's tutorial template, as the tutorial run in the field notes did (10 x 27-token batches);
``--template chat`` uses the model's chat template (with SmolLM2's default system prompt: about
2.2x longer rows), as ``examples/emoji_chatbot.py`` does.

Measured in one run, on the same collated batch:

1. **raw** forward + backward (``reft_model(**batch).loss.backward()``, called directly), and the
   same for pyreft's model, interleaved (medians);
2. **pyreft's Trainer** (``pyreft.ReftTrainerForCausalLM``) for ``--pyreft-steps`` steps, once
   before and once after reftlib's run (so load changes hit both sides). Two shims for
   transformers 5, in a subclass defined here: ``compute_loss`` accepts ``num_items_in_batch`` and
   ``tokenizer=`` is passed as ``processing_class=``. Its 100-step time is extrapolated from the
   median step (clearly labelled) unless ``--pyreft-steps 100``;
3. **reftlib's Trainer** (``reftlib.training.ReftTrainerForCausalLM``) for all 100 steps: total
   ``train()`` time, per-step wall time (between consecutive ``on_step_end`` callbacks) and the loss.

``--loss-seeds 42 1 2 3`` instead trains both Trainers to the end from the same pyreft-initialized
weights for each seed and tabulates the final and mean training losses (one 10-example trajectory
is noisy; several show whether one side ends lower systematically) and how many of the demo's 12
unseen prompts each trained model answers in emoji only (greedy, 32 new tokens, one unpadded
prompt at a time, in the same template as training; pyreft through its tutorial's ``generate``
call): pyreft parity, kept visible.

Usage::

    python benchmarks/emoji_training.py [--epochs 100] [--pyreft-steps 4] [--template tutorial|chat]
        [--loss-seeds S ...] [--threads N] [--update-docs] [--json FILE]

Default run: about 2 minutes on 2 idle CPU cores (``--pyreft-steps 100``, which trains pyreft to
the end and compares final losses: about 5; ``--loss-seeds``: about 5 per seed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import common  # first: may set OMP_WAIT_POLICY before torch is imported
import torch
from emoji_chatbot import TUTORIAL_TRAIN as TRAIN
from emoji_chatbot import UNSEEN, is_emoji_only
from transformers import TrainerCallback, TrainingArguments

import reftlib
from reftlib.training import (
    ReftTrainerForCausalLM,
    apply_chat_template,
    make_last_position_supervised_data_module,
)

LAYER, RANK, LR, SEED = 15, 4, 4e-3, 42
PYREFT_REFERENCE_S = 13 * 60 + 8  # pyreft's emoji tutorial on 2 CPU cores (field notes): 13 min 8 s
PYREFT_REFERENCE_STEP_S, PYREFT_REFERENCE_RAW_S = 7.9, 1.2
#: pyreft's emoji tutorial prompt template (the one its tutorial uses for TinyLlama-style chat models).
TUTORIAL_TEMPLATE = "<|user|>:%s</s>\n<|assistant|>:"


def log(message: str) -> None:
    """Print progress immediately."""
    print(message, flush=True)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (between consecutive ``on_step_end`` calls) and of ``train()``."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps.append(now - self._last)
        self._last = now


def training_args(output_dir: str, epochs: int | None = None, max_steps: int = -1, seed: int = SEED) -> TrainingArguments:
    """The demo's arguments (``examples/emoji_chatbot.py``), logging every step."""
    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=epochs or 1, max_steps=max_steps,
        per_device_train_batch_size=len(TRAIN), learning_rate=LR, lr_scheduler_type="linear",
        logging_steps=1, save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=0,
    )


def build_reftlib(model):
    """The demo's intervention: rank-4 LoReFT, block output of layer 15, last prompt token."""
    return reftlib.get_reft_model(model, reftlib.ReftConfig({
        "layer": LAYER, "component": "block_output", "positions": "l1",
        "intervention": reftlib.LoreftIntervention(low_rank_dimension=RANK),
    }))


def build_pyreft(pyreft, model):
    """pyreft's tutorial model: rank-4 LoReFT at layer 15's block output (fp32 intervention)."""
    config = pyreft.ReftConfig(representations={
        "layer": LAYER, "component": "block_output", "low_rank_dimension": RANK,
        "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=RANK,
                                                  dtype=torch.float32)})
    rm = pyreft.get_reft_model(model, config)
    rm.set_device("cpu" if not torch.cuda.is_available() else "cuda")
    rm.use_fast = False
    return rm


def pyreft_initial_weights(pyreft, base, seed: int = SEED) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LoReFT weights pyreft's run starts from (same seed, same construction as :func:`run_pyreft_trainer`).

    reftlib's run starts from them too, so the two final losses differ only by how training
    moves the weights (parametrization of R, Trainer), not by the random initialization, which on
    10 examples changes the final loss by more than either implementation does.
    """
    torch.manual_seed(seed)
    rm = build_pyreft(pyreft, copy.deepcopy(base))
    intervention = next(iter(rm.interventions.values()))
    if isinstance(intervention, (tuple, list)):  # older pyvene: (intervention, hook)
        intervention = intervention[0]
    rows = intervention.rotate_layer.weight.detach().T.clone()  # pyreft keeps R as [d, r] columns
    source = {k: v.detach().clone() for k, v in intervention.learned_source.state_dict().items()}
    return rows, source


def pyreft_trainer_class(pyreft):
    """pyreft's ``ReftTrainerForCausalLM`` with the two shims transformers 5 needs (nothing else changed)."""

    class ShimmedPyreftTrainer(pyreft.ReftTrainerForCausalLM):
        def __init__(self, *args: Any, tokenizer: Any = None, **kwargs: Any) -> None:
            if tokenizer is not None:
                kwargs.setdefault("processing_class", tokenizer)  # transformers 5 removed tokenizer=
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # transformers >= 4.46 passes num_items_in_batch; pyreft 0.1.0's signature lacks it
            return super().compute_loss(model, inputs, return_outputs=return_outputs)

    return ShimmedPyreftTrainer


def raw_step(model, batch: dict[str, Any], pyreft_style: bool):
    """A callable running forward + backward on ``batch`` (gradients dropped afterwards)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        if pyreft_style:
            locations = {"sources->base": (None, batch["intervention_locations"].permute(1, 0, 2).tolist())}
            _, out = model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                           unit_locations=locations, labels=batch["labels"])
        else:
            out = model(**batch)
        out.loss.backward()
        for p in params:
            p.grad = None

    return run


def batch_loss(model, batch: dict[str, Any], pyreft_style: bool) -> float:
    """Mean token loss of ``batch`` (no gradients, interventions as they are)."""
    with torch.no_grad():
        if pyreft_style:
            locations = {"sources->base": (None, batch["intervention_locations"].permute(1, 0, 2).tolist())}
            return float(model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                               unit_locations=locations, labels=batch["labels"])[1].loss)
        return float(model(**batch).loss)


def run_pyreft_trainer(pyreft, base, tokenizer, prompts, answers, steps: int, epochs: int,
                       seed: int = SEED) -> dict[str, Any]:
    """pyreft's Trainer on the tutorial recipe for ``steps`` steps (its schedule is that of ``epochs``)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    rm = build_pyreft(pyreft, model)
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"  # pyreft's tutorial tokenizer; its positions assume right padding
    data = pyreft.make_last_position_supervised_data_module(tok, model, prompts, answers)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(tmp, epochs=epochs, max_steps=steps if steps < epochs else -1, seed=seed)
        trainer = pyreft_trainer_class(pyreft)(model=rm, tokenizer=tok, args=args, callbacks=[timer], **data)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    rm.model.eval()
    for iv in rm.interventions.values():
        iv.eval()
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(len(prompts))])
    after = batch_loss(rm, batch, pyreft_style=True)
    return {"steps": timer.steps, "total_s": total, "losses": losses, "loss_after": after, "model": rm,
            "tokenizer": tok}


def run_reftlib_trainer(base, tokenizer, prompts, answers, epochs: int, seed: int,
                        initial: tuple[torch.Tensor, dict[str, torch.Tensor]] | None, *, max_steps: int = -1,
                        prefix_cache: bool | str = "auto", head_on_supervised: bool = True) -> dict[str, Any]:
    """reftlib's Trainer on the tutorial recipe (from ``initial`` LoReFT weights when given).

    ``prefix_cache=False`` and ``head_on_supervised=False`` switch off the Trainer's two shortcuts
    (skipping the frozen layers on repeated examples, LM head on supervised tokens only) for the
    ablation.
    """
    torch.manual_seed(seed)
    reft_model = build_reftlib(copy.deepcopy(base))
    if initial is not None:
        intervention = next(iter(reft_model.interventions.values()))
        intervention.rotate_layer.set_weight(initial[0])
        intervention.learned_source.load_state_dict(initial[1])
    data = make_last_position_supervised_data_module(tokenizer, reft_model.model, prompts, answers)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, prefix_cache=prefix_cache,
                                         args=training_args(tmp, epochs, max_steps=max_steps, seed=seed),
                                         callbacks=[timer], **data)
        if not head_on_supervised:
            trainer._head_on_supervised = False
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    reft_model.eval()
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(len(prompts))])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"total_s": total, "steps": timer.steps, "losses": losses,
            "loss_after": batch_loss(reft_model, batch, pyreft_style=False), "model": reft_model}


def unseen_answers(model, tokenizer, unseen_prompts: list[str], *, pyreft_style: bool,
                   max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to the unseen prompts, one unpadded prompt at a time, the intervention at its last token.

    pyreft's side is the tutorial's own call (``unit_locations={"sources->base": (None, [[[last]]])}``,
    ``intervene_on_prompt=True``); reftlib's is ``generate(..., unit_locations="l1")``.
    """
    texts = []
    for prompt in unseen_prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            if pyreft_style:
                last = enc["input_ids"].shape[-1] - 1
                _, out = model.generate(dict(enc), unit_locations={"sources->base": (None, [[[last]]])},
                                        intervene_on_prompt=True, **kwargs)
            else:
                out = model.generate(**enc, unit_locations="l1", **kwargs)
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[-1]:], skip_special_tokens=True).strip())
    return texts


def compare_losses(pyreft, base, tokenizer, prompts, answers, seeds: list[int], epochs: int,
                   unseen_prompts: list[str] | None = None) -> list[dict[str, Any]]:
    """Final training loss of pyreft's and reftlib's Trainers from the same initial weights, per seed.

    One seed is one trajectory on 10 examples, which the initialization and the order of floating-
    point operations move by more than either implementation does; several seeds show whether one
    implementation ends lower systematically.
    """
    rows = []
    for seed in seeds:
        initial = pyreft_initial_weights(pyreft, base, seed)
        theirs = run_pyreft_trainer(pyreft, base, tokenizer, prompts, answers, epochs, epochs, seed=seed)
        ours = run_reftlib_trainer(base, tokenizer, prompts, answers, epochs, seed, initial)
        rows.append({"seed": seed, "pyreft": theirs["losses"][-1], "pyreft_after": theirs["loss_after"],
                     "pyreft_s": theirs["total_s"], "reftlib": ours["losses"][-1],
                     "reftlib_after": ours["loss_after"], "reftlib_s": ours["total_s"],
                     "pyreft_mean": statistics.mean(theirs["losses"]), "reftlib_mean": statistics.mean(ours["losses"])})
        if unseen_prompts:
            for name, run, pyreft_style in (("pyreft", theirs, True), ("reftlib", ours, False)):
                try:
                    texts = unseen_answers(run["model"], run.get("tokenizer", tokenizer), unseen_prompts,
                                           pyreft_style=pyreft_style)
                    rows[-1][f"{name}_unseen"] = sum(map(is_emoji_only, texts))
                    rows[-1][f"{name}_answers"] = texts
                except Exception as exc:  # pyreft's generate on this transformers: report, do not hide
                    rows[-1][f"{name}_unseen"] = f"failed: {type(exc).__name__}: {exc}"
        log(f"  seed {seed}: last-step loss pyreft {rows[-1]['pyreft']:.4f} ({theirs['total_s']:.0f} s), "
            f"reftlib {rows[-1]['reftlib']:.4f} ({ours['total_s']:.0f} s); emoji-only unseen answers: pyreft "
            f"{rows[-1].get('pyreft_unseen', '-')}, reftlib {rows[-1].get('reftlib_unseen', '-')}")
        del theirs["model"], ours["model"]
    return rows


def ablation(base, tokenizer, prompts, answers, epochs: int, steps: int, rounds: int = 2) -> dict[str, float]:
    """Median step time of reftlib's Trainer with each shortcut on or off (``steps`` steps per run, interleaved)."""
    variants = {"neither": (False, False), "LM head on supervised tokens": (False, True),
                "prefix cache": ("auto", False), "both (default)": ("auto", True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, (cache, head) in variants.items():
            run = run_reftlib_trainer(base, tokenizer, prompts, answers, epochs, SEED, None, max_steps=steps,
                                      prefix_cache=cache, head_on_supervised=head)
            times[name] += run["steps"][2:]  # step 1 records the prefix; step 2 may still warm up
            log(f"  round {round_index + 1}, {name}: median step {statistics.median(run['steps'][2:]):.3f} s")
    return {name: statistics.median(values) for name, values in times.items()}


def render_loss_seeds(rows: list[dict[str, Any]], epochs: int) -> str:
    """Markdown table of :func:`compare_losses`."""
    table = common.markdown_table(
        ["seed", "pyreft last-step loss", "reftlib last-step loss", "pyreft mean training loss",
         "reftlib mean training loss", "pyreft eval loss after", "reftlib eval loss after",
         f"pyreft emoji-only unseen (of {len(UNSEEN)})", f"reftlib emoji-only unseen (of {len(UNSEEN)})"],
        [[r["seed"], f"{r['pyreft']:.4f}", f"{r['reftlib']:.4f}", f"{r['pyreft_mean']:.4f}", f"{r['reftlib_mean']:.4f}",
          f"{r['pyreft_after']:.4f}", f"{r['reftlib_after']:.4f}", r.get("pyreft_unseen", "-"),
          r.get("reftlib_unseen", "-")] for r in rows])
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("pyreft", "reftlib", "pyreft_after", "reftlib_after")}
    wins = sum(r["reftlib"] <= r["pyreft"] for r in rows)
    return (f"Final loss over {len(rows)} seeds ({epochs} steps each, both Trainers from the same pyreft-initialized "
            f"weights per seed):\n\n{table}\n\nMean last-step loss: pyreft {mean['pyreft']:.4f}, reftlib "
            f"{mean['reftlib']:.4f}; eval loss after training: pyreft {mean['pyreft_after']:.4f}, reftlib "
            f"{mean['reftlib_after']:.4f}. reftlib ends at or below pyreft on {wins} of {len(rows)} seeds.\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and optionally writes) the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100, help="steps of reftlib's Trainer (one batch per epoch)")
    parser.add_argument("--pyreft-steps", type=int, default=4,
                        help="steps of pyreft's Trainer per bracket (before and after reftlib's run; 0 = skip; "
                             ">= --epochs runs pyreft's full training once)")
    parser.add_argument("--raw-reps", type=int, default=5, help="interleaved raw forward+backward repetitions")
    parser.add_argument("--template", choices=["tutorial", "chat"], default="tutorial",
                        help="prompt format: pyreft's tutorial template (default) or the model's chat template")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-pyreft", action="store_true", help="do not run pyreft even if installed")
    parser.add_argument("--loss-seeds", type=int, nargs="+", default=None,
                        help="only compare final losses of pyreft's and reftlib's Trainers over these seeds")
    parser.add_argument("--ablation-steps", type=int, default=12,
                        help="steps per ablation run of the Trainer's shortcuts (0: skip the ablation)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peers = None if args.no_pyreft else common.import_pyreft()
    machine = common.machine_info(device)
    log(common.describe_machine(machine))

    torch.manual_seed(SEED)
    base, tokenizer = common.load_model(None, device, torch.float32)
    questions = [q for q, _ in TRAIN]
    if args.template == "chat":
        prompts = apply_chat_template(tokenizer, questions)
    else:
        prompts = [TUTORIAL_TEMPLATE % q for q in questions]
    answers = [a for _, a in TRAIN]

    if args.loss_seeds:
        if peers is None:
            parser.error("--loss-seeds needs pyreft (pip install --no-deps pyreft pyvene)")
        log(f"final losses over seeds {args.loss_seeds}")
        unseen = apply_chat_template(tokenizer, UNSEEN) if args.template == "chat" else [TUTORIAL_TEMPLATE % q for q in UNSEEN]
        rows = compare_losses(peers[0], base, tokenizer, prompts, answers, args.loss_seeds, args.epochs, unseen)
        machine["load_end"] = common.load_average()
        text = f"*Machine:* {common.describe_machine(machine)}\n\n" + render_loss_seeds(rows, args.epochs)
        print("\n" + text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": machine, "loss_seeds": rows}, indent=1, default=str))
        if args.update_docs:
            common.replace_section(common.DOCS / "benchmarks.md", "emoji-seeds", text)
        return {"loss_seeds": rows}

    torch.manual_seed(SEED)
    reft_model = build_reftlib(copy.deepcopy(base))
    same_init = peers is not None
    if same_init:
        rows, source = pyreft_initial_weights(peers[0], base)
        intervention = next(iter(reft_model.interventions.values()))
        intervention.rotate_layer.set_weight(rows)
        intervention.learned_source.load_state_dict(source)
    data = make_last_position_supervised_data_module(tokenizer, reft_model.model, prompts, answers)
    batch = data["data_collator"]([data["train_dataset"][i] for i in range(len(TRAIN))])
    batch = {k: (v if k == "intervention_locations" else v.to(device)) for k, v in batch.items()}
    lengths = batch["attention_mask"].sum(1).tolist()
    prompt_lengths = (batch["intervention_locations"][:, 0, 0] + 1).tolist()
    tokens = {"batch_shape": list(batch["input_ids"].shape), "real_tokens": int(sum(lengths)),
              "min_len": min(lengths), "max_len": max(lengths), "prompt_min": min(prompt_lengths),
              "prompt_max": max(prompt_lengths), "supervised": int((batch["labels"] != -100).sum())}
    log(f"batch {tokens['batch_shape']} (rows {tokens['min_len']}-{tokens['max_len']} tokens, prompts "
        f"{tokens['prompt_min']}-{tokens['prompt_max']}, {tokens['supervised']} supervised tokens)")
    results: dict[str, Any] = {"machine": machine, "tokens": tokens, "epochs": args.epochs, "notes": [],
                               "template": args.template, "same_init": same_init}

    # 1. raw forward + backward, interleaved with pyreft's
    reft_model.train()
    systems = {"reftlib raw": raw_step(reft_model, batch, pyreft_style=False)}
    pyreft_raw_model = None
    if peers is not None:
        pyreft_raw_model = build_pyreft(peers[0], copy.deepcopy(base))
        systems["pyreft raw"] = raw_step(pyreft_raw_model, batch, pyreft_style=True)
    log("raw forward + backward on the collated batch")
    raw = common.interleaved(systems, args.raw_reps, device, warmup=1, log=log)
    results["raw_s"] = {n: raw.median(n) for n in raw.seconds}
    results["raw_errors"] = raw.errors
    del pyreft_raw_model

    # 2. pyreft's Trainer (before)
    pyreft_runs = []
    full_pyreft = peers is not None and args.pyreft_steps >= args.epochs
    if peers is not None and args.pyreft_steps > 0:
        log(f"pyreft Trainer, {min(args.pyreft_steps, args.epochs)} steps")
        try:
            pyreft_runs.append(run_pyreft_trainer(peers[0], base, tokenizer, prompts, answers,
                                                  min(args.pyreft_steps, args.epochs), args.epochs))
            log(f"  steps: {', '.join(f'{s:.2f}s' for s in pyreft_runs[-1]['steps'])}")
        except Exception as exc:
            results["notes"].append(f"pyreft's Trainer failed: {type(exc).__name__}: {exc}")
            log(f"  FAILED: {exc}")

    # 3. reftlib's Trainer, the whole recipe
    log(f"reftlib Trainer, {args.epochs} steps")
    timer = StepTimer()
    reft_model.train()
    before_loss = batch_loss(reft_model, batch, pyreft_style=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args(tmp, args.epochs),
                                         callbacks=[timer], **data)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    reft_model.eval()
    results["reftlib"] = {"total_s": total, "steps": timer.steps, "losses": losses,
                          "loss_before": before_loss, "loss_after": batch_loss(reft_model, batch, False),
                          "prefix_cache": {"hits": trainer.prefix_cache.hits, "misses": trainer.prefix_cache.misses}}
    log(f"  {total:.1f} s, median step {statistics.median(timer.steps):.3f} s, loss {losses[0]:.3f} -> "
        f"{losses[-1]:.4f}")

    # 4. ablation: the Trainer's shortcuts one at a time
    if args.ablation_steps > 2:
        log(f"ablation: reftlib Trainer, {args.ablation_steps} steps per variant, 2 rounds")
        results["ablation"] = ablation(base, tokenizer, prompts, answers, args.epochs, args.ablation_steps)

    # 5. pyreft's Trainer (after)
    if peers is not None and args.pyreft_steps > 0 and not full_pyreft and pyreft_runs:
        log(f"pyreft Trainer again, {args.pyreft_steps} steps")
        with contextlib.suppress(Exception):
            pyreft_runs.append(run_pyreft_trainer(peers[0], base, tokenizer, prompts, answers,
                                                  args.pyreft_steps, args.epochs))
            log(f"  steps: {', '.join(f'{s:.2f}s' for s in pyreft_runs[-1]['steps'])}")
    if pyreft_runs:
        # the first step of each run includes optimizer creation and warm-up: drop it
        steps = [s for run in pyreft_runs for s in (run["steps"][1:] if len(run["steps"]) > 1 else run["steps"])]
        results["pyreft"] = {"runs": pyreft_runs, "median_step_s": statistics.median(steps), "full": full_pyreft}
    results["machine"]["load_end"] = common.load_average()
    text = render(results)
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.update_docs:
        common.replace_section(common.DOCS / "benchmarks.md", "emoji", text)
    return results


def render(results: dict[str, Any]) -> str:
    """The Markdown section for ``docs/benchmarks.md``."""
    t = results["tokens"]
    r = results["reftlib"]
    epochs = results["epochs"]
    step = statistics.median(r["steps"][1:] if len(r["steps"]) > 1 else r["steps"])
    raw = results["raw_s"].get("reftlib raw")
    template = ("chat-templated (`--template chat`)" if results.get("template") == "chat"
                else f"formatted with pyreft's tutorial template `{TUTORIAL_TEMPLATE!r}`")
    width = t["batch_shape"][1]
    scale = f", so every step here does about {width / 27:.1f}x the work of that one" if width > 32 else ""
    out = [f"*Machine:* {common.describe_machine(results['machine'])}", "",
           f"*Data:* the 10 `TRAIN` examples of `examples/emoji_chatbot.py`, {template}: one padded batch of "
           f"{t['batch_shape'][0]} x {t['batch_shape'][1]} tokens (rows of {t['min_len']}-{t['max_len']} real tokens, "
           f"prompts of {t['prompt_min']}-{t['prompt_max']} tokens, {t['supervised']} supervised answer tokens). "
           f"pyreft's tutorial measurement used 10 x 27-token batches{scale}."
           + (" Both runs start from the same LoReFT weights (pyreft's seeded initialization, copied into "
              "reftlib's intervention)." if results.get("same_init") else ""), ""]
    rows = [["reftlib Trainer (measured)", f"{epochs}", f"{r['total_s']:.1f}", f"{step:.3f}",
             common.fmt(raw, "{:.3f}"), common.fmt(step / raw if raw else None, "{:.2f}x"),
             f"{r['losses'][0]:.3f} → {r['losses'][-1]:.4f} (eval after: {r['loss_after']:.4f})"]]
    p = results.get("pyreft")
    praw = results["raw_s"].get("pyreft raw")
    if p:
        if p["full"]:
            run = p["runs"][0]
            rows.append(["pyreft Trainer (measured)", f"{len(run['steps'])}", f"{run['total_s']:.1f}",
                         f"{p['median_step_s']:.3f}", common.fmt(praw, "{:.3f}"),
                         common.fmt(p["median_step_s"] / praw if praw else None, "{:.2f}x"),
                         f"{run['losses'][0]:.3f} → {run['losses'][-1]:.4f} (eval after: {run['loss_after']:.4f})"])
        else:
            n = sum(len(run["steps"]) for run in p["runs"])
            rows.append([f"pyreft Trainer ({n} steps measured, **{epochs} extrapolated**)", f"{epochs}",
                         f"≈ {p['median_step_s'] * epochs:.0f} (extrapolated)", f"{p['median_step_s']:.3f}",
                         common.fmt(praw, "{:.3f}"), common.fmt(p["median_step_s"] / praw if praw else None, "{:.2f}x"),
                         "—"])
    rows.append(["pyreft, field notes (10 x 27 tokens, 2 cores)", "100", f"{PYREFT_REFERENCE_S}",
                 f"{PYREFT_REFERENCE_STEP_S}", f"{PYREFT_REFERENCE_RAW_S}",
                 f"{PYREFT_REFERENCE_STEP_S / PYREFT_REFERENCE_RAW_S:.2f}x", "—"])
    out.append(common.markdown_table(
        ["run", "steps", "train() s", "median step s", "raw fwd+bwd s", "step / raw", "loss (first → last step)"],
        rows))
    out.append("")
    if epochs == 100:
        lines = [f"reftlib's 100-step training took {r['total_s']:.0f} s: **{PYREFT_REFERENCE_S / r['total_s']:.1f}x** "
                 "faster than the 13 min 8 s of pyreft's tutorial run (target ≥ 5x)"]
    else:
        estimate = r["total_s"] + step * (100 - epochs)
        lines = [f"only {epochs} steps were run; extrapolated to 100 steps reftlib would take ≈ {estimate:.0f} s, "
                 f"≈ {PYREFT_REFERENCE_S / estimate:.1f}x faster than the 13 min 8 s of pyreft's tutorial run (target ≥ 5x)"]
    if p:
        lines.append(f"against pyreft's Trainer on the *same* batches in this run, reftlib's step is "
                     f"**{p['median_step_s'] / step:.2f}x** faster (median step times)")
        if p["full"]:
            run = p["runs"][0]
            verdict = "as low or lower" if r["loss_after"] <= run["loss_after"] else "**higher**"
            lines.append(f"final loss (eval mode, training batch): reftlib {r['loss_after']:.4f} vs pyreft "
                         f"{run['loss_after']:.4f}: reftlib's is {verdict}")
    lines.append(f"reftlib's loss on the training batch, eval mode: {r['loss_before']:.3f} before training, "
                 f"{r['loss_after']:.4f} after")
    cache = r.get("prefix_cache")
    if cache:
        lines.append(f"reftlib's Trainer step is below the raw forward + backward (plain `reft_model(**batch)` with "
                     f"full logits) because it computes the LM head on the {t['supervised']} supervised tokens only "
                     f"and, from the second step on, skips layers 0-{LAYER} (the frozen prefix below the intervention: "
                     f"{cache['hits']} steps replayed it, {cache['misses']} ran it); same loss and gradients")
    out += [f"* {line}." for line in lines]
    out += [f"* {note}" for note in results.get("notes", [])]
    ablation_times = results.get("ablation")
    if ablation_times:
        slowest = ablation_times["neither"]
        out += ["", "Where reftlib's Trainer step comes from (median step after the first two, two interleaved "
                "rounds per variant, same batch):", "",
                common.markdown_table(["Trainer shortcuts", "median step s", "vs neither"],
                                      [[name, f"{value:.3f}", f"{value / slowest:.2f}x"]
                                       for name, value in ablation_times.items()])]
    return "\n".join(out)


if __name__ == "__main__":
    main()
