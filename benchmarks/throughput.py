"""Generation throughput, training step time / peak memory and trainable parameters of reftlib vs peers.

Usage::

    python benchmarks/throughput.py [--model PATH] [--device cpu|cuda] [--dtype fp32|bf16]
        [--quick] [--threads N] [--update-docs] [--json FILE]

Systems (each on its own copy of the same base model):

* **Generation** (greedy, ``--new-tokens`` tokens forced with ``min_new_tokens``, batch 1 and a
  left-padded batch of 8 chat-templated prompts): the base model; reftlib LoReFT (rank 4, middle
  layer, last prompt token) applied on the prompt only (``mode="prompt"``) and on every generated
  token (``mode="generated"``); pyreft/pyvene with the same intervention (``intervene_on_prompt``);
  PEFT LoRA (r=8 on q/v) unmerged and merged.
* **Training step** (``zero_grad`` + forward + backward + ``AdamW.step``, called directly, loss =
  the model's causal-LM loss on every token) on batch 8 x 64 and 8 x 256 tokens: reftlib LoReFT and
  DiReFT (rank 8, middle layer, positions ``f7+l7``), reftlib LoFiT offsets
  (:class:`~reftlib.HeadBiasIntervention` on 8 heads, 2 in each of 4 middle layers, component
  ``head_output``, all positions), pyreft LoReFT (same layer, rank and positions) and PEFT LoRA
  (r=8 on q/v). Peak memory and the number of decoder layers that backward reaches are measured
  on one extra step per system (see :mod:`common`).

Every measurement interleaves the systems, rotating their order each round; the tables give
medians and the median of paired per-round ratios. pyreft / pyvene are used when installed
(``pip install --no-deps pyreft==0.1.0 pyvene==0.1.8`` next to the current transformers).

The default run takes about 10 minutes on 2 CPU cores (``--quick``: about 2 minutes, 8 x 64 only).
``--update-docs`` writes the tables into ``docs/benchmarks.md`` and the chart into
``docs/img/benchmarks_throughput.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # first: may set OMP_WAIT_POLICY before torch is imported
import torch

import reftlib

GEN_SYSTEMS = ["base", "reftlib prompt", "reftlib generated", "pyreft prompt", "lora", "lora merged"]
TRAIN_SYSTEMS = ["reftlib LoReFT", "reftlib DiReFT", "reftlib LoFiT", "pyreft LoReFT", "lora"]
GEN_RANK, TRAIN_RANK, LORA_RANK = 4, 8, 8
TRAIN_POSITIONS = (7, 7)  # f7+l7


@dataclass
class Results:
    """Everything a run measured (also written as JSON)."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    """Print progress immediately."""
    print(message, flush=True)


# --------------------------------------------------------------------------- builders
def middle_layer(model) -> int:
    """The middle decoder layer (15 of 30 for SmolLM2-135M)."""
    return model.config.num_hidden_layers // 2


def lofit_heads(model) -> dict[int, list[int]]:
    """8 heads for the LoFiT system: heads 0 and half the heads, in 4 layers spread over the middle."""
    layers = model.config.num_hidden_layers
    step = max(layers // 10, 1)
    chosen = [min(layers // 3 + i * step, layers - 1) for i in range(4)]
    heads = model.config.num_attention_heads
    return {layer: [0, heads // 2] for layer in dict.fromkeys(chosen)}


def reftlib_model(model, kind: str, layer: int, rank: int, positions: str):
    """A reftlib ReftModel with one ``kind`` intervention (``loreft``/``direft``) at ``layer``."""
    cls = {"loreft": reftlib.LoreftIntervention, "direft": reftlib.DireftIntervention}[kind]
    return reftlib.get_reft_model(model, reftlib.ReftConfig({
        "layer": layer, "component": "block_output", "positions": positions,
        "intervention": cls(low_rank_dimension=rank),
    }))


def reftlib_lofit(model):
    """A reftlib ReftModel with LoFiT offsets (HeadBiasIntervention) on the heads of :func:`lofit_heads`."""
    reps = [{"layer": layer, "component": "head_output", "positions": "all",
             "intervention": reftlib.HeadBiasIntervention(heads=heads)}
            for layer, heads in lofit_heads(model).items()]
    return reftlib.get_reft_model(model, reftlib.ReftConfig(reps))


def pyreft_model(pyreft, model, layer: int, rank: int):
    """pyreft's LoReFT at ``layer``'s block output (fp32 intervention; ``use_fast`` off)."""
    dtype = next(model.parameters()).dtype
    intervention = pyreft.LoreftIntervention(embed_dim=model.config.hidden_size, low_rank_dimension=rank,
                                             dtype=dtype)
    config = pyreft.ReftConfig(representations={"layer": layer, "component": "block_output",
                                                "low_rank_dimension": rank, "intervention": intervention})
    rm = pyreft.get_reft_model(model, config)
    rm.use_fast = False  # pyvene's fast path applies row 0's positions to every row
    return rm


def lora_model(model, rank: int = LORA_RANK):
    """PEFT LoRA (r=8, alpha=16, q_proj and v_proj, no dropout)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every parameter of ``model`` (pyreft and reftlib do this too)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- generation
def generation_benchmark(base, tokenizer, device: torch.device, args, results: Results, peers) -> None:
    """Tokens/s of every generation system at batch 1 and batch 8 (interleaved, medians)."""
    layer = middle_layer(base)
    prompts = common.chat_prompts(tokenizer, common.QUESTIONS)
    tokenizer.padding_side = "left"
    batches = {b: tokenizer(prompts[:b], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
               for b in (1, 8)}
    new = args.new_tokens
    full = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prefill = dict(full, max_new_tokens=1, min_new_tokens=1)

    # Every system, the base model included, runs on its own deep copy: the loaded model's weights may
    # be memory-mapped from the safetensors file (unaligned, file-backed), the copies are not.
    base = common.fresh_copy(base)
    models: dict[str, Any] = {"base": base}
    rm = reftlib_model(common.fresh_copy(base), "loreft", layer, GEN_RANK, "l1").eval()
    models["reftlib"] = rm
    if peers["pyreft"] is not None:
        try:
            prm = pyreft_model(peers["pyreft"][0], common.fresh_copy(base), layer, GEN_RANK)
            prm.set_device(device)
            for iv in prm.interventions.values():
                iv.eval()
            models["pyreft"] = prm
        except Exception as exc:
            results.notes.append(f"pyreft generation could not be set up: {type(exc).__name__}: {exc}")
    lora = lora_model(common.fresh_copy(base)).eval()
    with torch.no_grad():  # LoRA's B starts at 0; give it values so the adapter does real work
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    models["lora"] = lora
    models["lora merged"] = lora_model(common.fresh_copy(base)).merge_and_unload().eval()

    def system(name: str, batch: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> Callable[[], Any] | None:
        b, t = batch["input_ids"].shape
        if name == "base":
            return lambda: base.generate(**batch, **kwargs)
        if name == "reftlib prompt":
            return lambda: rm.generate(**batch, unit_locations="l1", mode="prompt", **kwargs)
        if name == "reftlib generated":
            return lambda: rm.generate(**batch, mode="generated", **kwargs)
        if name == "pyreft prompt":
            if "pyreft" not in models:
                return None
            prm = models["pyreft"]
            locations = {"sources->base": (None, [[[t - 1]] * b])}  # left padding: the last column
            return lambda: prm.generate(dict(batch), unit_locations=locations, intervene_on_prompt=True, **kwargs)
        if name == "lora":
            return lambda: lora.generate(**batch, **kwargs)
        if name == "lora merged":
            return lambda: models["lora merged"].generate(**batch, **kwargs)
        raise KeyError(name)

    with torch.no_grad():
        for b, batch in batches.items():
            log(f"generation, batch {b} ({batch['input_ids'].shape[1]} prompt tokens, {new} new tokens)")
            systems = {n: fn for n in GEN_SYSTEMS if (fn := system(n, batch, full)) is not None}
            timings = common.interleaved(systems, args.rounds, device, log=log)
            log(f"  prefill only (1 new token), batch {b}")
            systems = {n: fn for n in GEN_SYSTEMS if n in timings.seconds and (fn := system(n, batch, prefill))}
            first = common.interleaved(systems, args.prefill_rounds, device, log=log)
            decode = {n: b * (new - 1) / (timings.median(n) - first.median(n))
                      for n in first.seconds if timings.median(n) > first.median(n)}
            results.generation[f"batch{b}"] = {
                "prompt_tokens": int(batch["input_ids"].shape[1]),
                "new_tokens": new,
                "seconds": timings.seconds,
                "prefill_seconds": first.seconds,
                "errors": timings.errors,
                "tokens_per_s": {n: b * new / timings.median(n) for n in timings.seconds},
                "decode_tokens_per_s": decode,
                "ratio_vs_base": {n: timings.paired_ratio(n, "base") for n in timings.seconds},
            }
    if "pyreft" not in models and "pyreft prompt" not in results.generation.get("batch1", {}).get("errors", {}):
        results.notes.append("pyreft/pyvene not installed: pyreft rows skipped")
    models.clear()
    gc.collect()


# --------------------------------------------------------------------------- training
def training_systems(base, device: torch.device, peers, batch: int, length: int, notes: list[str]):
    """``{name: (step_fn, trainable_params, module)}`` for every training system on ``batch x length`` tokens."""
    layer = middle_layer(base)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(10, vocab - 10, (batch, length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    n_first, n_last = TRAIN_POSITIONS
    positions = list(range(n_first)) + list(range(length - n_last, length))
    locations = torch.tensor([positions] * batch).unsqueeze(1)  # [batch, 1 intervention, n] on the CPU
    pyreft_locations = {"sources->base": (None, [[positions] * batch])}
    systems: dict[str, tuple[Callable[[], Any], list, torch.nn.Module]] = {}

    def make_step(module, forward: Callable[[], torch.Tensor]):
        params = trainable(module)
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = forward()
            loss.backward()
            optimizer.step()

        return step, params

    for kind, name in (("loreft", "reftlib LoReFT"), ("direft", "reftlib DiReFT")):
        rm = reftlib_model(common.fresh_copy(base), kind, layer, TRAIN_RANK, f"f{n_first}+l{n_last}").train()
        step, params = make_step(rm, lambda rm=rm: rm(input_ids=ids, attention_mask=mask, labels=ids,
                                                      intervention_locations=locations).loss)
        systems[name] = (step, params, rm)
    lofit = reftlib_lofit(common.fresh_copy(base)).train()
    step, params = make_step(lofit, lambda: lofit(input_ids=ids, attention_mask=mask, labels=ids).loss)
    systems["reftlib LoFiT"] = (step, params, lofit)
    if peers["pyreft"] is not None:
        try:
            prm = pyreft_model(peers["pyreft"][0], freeze(common.fresh_copy(base)), layer, TRAIN_RANK)
            prm.set_device(device)
            prm.model.train()
            for iv in prm.interventions.values():
                iv.train()
            step, params = make_step(prm, lambda: prm({"input_ids": ids, "attention_mask": mask},
                                                      unit_locations=pyreft_locations, labels=ids)[1].loss)
            systems["pyreft LoReFT"] = (step, params, prm)
        except Exception as exc:
            notes.append(f"pyreft training could not be set up: {type(exc).__name__}: {exc}")
    lora = lora_model(freeze(common.fresh_copy(base))).train()
    step, params = make_step(lora, lambda: lora(input_ids=ids, attention_mask=mask, labels=ids).loss)
    systems["lora"] = (step, params, lora)
    return systems


def training_benchmark(base, device: torch.device, args, results: Results, peers) -> None:
    """Step time, peak memory and backward depth of every training system, per shape."""
    for length in args.lengths:
        shape = f"8x{length}"
        log(f"training step, batch 8 x {length} tokens")
        systems = training_systems(base, device, peers, 8, length, results.notes)
        for name, (_step, params, _module) in systems.items():
            results.parameters.setdefault(name, sum(p.numel() for p in params))
        rounds = args.train_rounds if length <= 64 else args.long_rounds
        timings = common.interleaved({n: s[0] for n, s in systems.items()}, rounds, device, warmup=1, log=log)
        memory, depth = {}, {}
        for name, (step, params, _module) in systems.items():
            if name in timings.errors:
                continue
            peak, depth[name] = common.profile_step(step, device)
            memory[name] = peak + common.trainable_state_bytes(params)
            log(f"  {name}: peak step memory {memory[name] / 2**20:.1f} MiB, "
                f"backward reaches {depth[name]} decoder layers")
        results.training[shape] = {
            "seconds": timings.seconds,
            "errors": timings.errors,
            "median_s": {n: timings.median(n) for n in timings.seconds},
            "ratio_vs_lora": {n: (1 / r if (r := timings.paired_ratio(n, "lora")) else None)
                              for n in timings.seconds},
            "ratio_vs_pyreft": {n: (1 / r if (r := timings.paired_ratio(n, "pyreft LoReFT")) else None)
                                for n in timings.seconds},
            "peak_memory_bytes": memory,
            "backward_layers": depth,
        }
        del systems
        gc.collect()


# --------------------------------------------------------------------------- report
def targets(results: Results) -> list[tuple[str, str, str]]:
    """``(target, measured, status)`` rows for the issue's targets.

    Two estimators are shown for every timing ratio: the median of the per-round paired ratios
    (with the range over rounds) and the ratio of the best (minimum) times over rounds. On a shared
    machine interference only ever slows a run down, so the best-of ratio is the better estimate of
    the intrinsic cost (``timeit``'s rule); the status uses it and says when the median disagrees.
    """
    rows = []

    def verdict(best: float | None, median: float | None, ok) -> str:
        if best is None:
            return "n/a"
        status = "met" if ok(best) else "**not met**"
        if median is not None and ok(median) != ok(best):
            status += " (median: " + ("met" if ok(median) else "not met") + ")"
        return status

    def ratio(seconds: dict[str, list[float]], name: str, reference: str, speed: bool):
        """``(median paired, best-of, text)`` for ``name`` against ``reference``."""
        if name not in seconds or reference not in seconds:
            return None, None, "n/a"
        values = common.Timings(seconds).paired_ratios(name, reference)
        values = values if speed else [1 / v for v in values]
        a, b = min(seconds[name]), min(seconds[reference])
        best = b / a if speed else a / b
        median = statistics.median(values)
        spread = f", rounds {min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""
        return median, best, f"best-of {best:.3f}x; median {median:.3f}x{spread}"

    for b in (1, 8):
        g = results.generation.get(f"batch{b}")
        median, best, text = ratio(g["seconds"], "reftlib prompt", "base", True) if g else (None, None, "n/a")
        rows.append((f"generation, batch {b}: reftlib prompt-only LoReFT ≥ 0.97x base tokens/s", text,
                     verdict(best, median, lambda r: r >= 0.97)))
    g1, g8 = results.generation.get("batch1"), results.generation.get("batch8")
    if g1 and g8:
        for name in ("base", "reftlib prompt"):
            for key, what in (("tokens_per_s", "prefill included"), ("decode_tokens_per_s", "decode only")):
                if name in g1[key] and name in g8[key]:
                    r = g8[key][name] / g1[key][name]
                    rows.append((f"batch 8 ≥ 4x the tokens/s of batch 1 ({name}, {what}, medians)", f"{r:.2f}x",
                                 "met" if r >= 4 else "**not met**"))
    for shape, t in results.training.items():
        median, best, text = ratio(t["seconds"], "reftlib LoReFT", "lora", False)
        rows.append((f"training {shape}: reftlib LoReFT step ≤ 0.85x LoRA's", text,
                     verdict(best, median, lambda r: r <= 0.85)))
        median, best, text = ratio(t["seconds"], "reftlib LoReFT", "pyreft LoReFT", False)
        rows.append((f"training {shape}: reftlib LoReFT step ≤ 1.0x pyreft's", text,
                     verdict(best, median, lambda r: r <= 1.0)))
        m = t["peak_memory_bytes"]
        if "reftlib LoReFT" in m and "lora" in m:
            r = m["reftlib LoReFT"] / m["lora"]
            rows.append((f"training {shape}: reftlib LoReFT peak memory ≤ LoRA's", f"{r:.3f}x",
                         "met" if r <= 1 else "**not met**"))
    return rows


def render(results: Results) -> str:
    """The Markdown section for ``docs/benchmarks.md``."""
    out = [f"*Machine:* {common.describe_machine(results.machine)}", ""]
    s = results.settings
    out.append(f"*Settings:* model `{s['model']}` ({s['dtype']}); {s['rounds']} interleaved rounds per generation "
               f"measurement ({s['prefill_rounds']} for prefill-only), {s['train_rounds']} per training shape of 64 "
               f"tokens and {s['long_rounds']} for longer ones, each after a warm-up call. Tables give medians; "
               "ratios are medians of per-round paired ratios (each round runs every system back to back, in a "
               "rotating order).")
    out.append("")
    if results.generation:
        out.append("#### Generation throughput (new tokens/s, greedy)")
        out.append("")
        header = ["system"]
        for b in (1, 8):
            if f"batch{b}" in results.generation:
                header += [f"batch {b} tok/s", f"batch {b} vs base", f"batch {b} decode-only tok/s"]
        rows = []
        for name in GEN_SYSTEMS:
            row = [name]
            for b in (1, 8):
                g = results.generation.get(f"batch{b}")
                if g is None:
                    continue
                if name in g["errors"]:
                    row += ["failed", "—", "—"]
                else:
                    row += [common.fmt(g["tokens_per_s"].get(name), "{:.1f}"),
                            common.fmt(g["ratio_vs_base"].get(name), "{:.3f}x"),
                            common.fmt(g["decode_tokens_per_s"].get(name), "{:.1f}")]
            rows.append(row)
        out.append(common.markdown_table(header, rows))
        g1 = results.generation.get("batch1", {})
        g8 = results.generation.get("batch8", {})
        out.append("")
        out.append(f"Prompt lengths: batch 1 = {g1.get('prompt_tokens', '?')} tokens, batch 8 = "
                   f"{g8.get('prompt_tokens', '?')} tokens (left-padded); {g1.get('new_tokens', '?')} new tokens "
                   "per row (forced with `min_new_tokens`). tok/s = new tokens / `generate()` time, prefill "
                   "included; decode-only = the tokens after the first / (time - time of a 1-token `generate()`).")
        out.append("")
    if results.training:
        out.append("#### Training step (zero_grad + forward + backward + AdamW step, called directly)")
        out.append("")
        header = ["system", "trainable params"]
        for shape in results.training:
            header += [f"{shape} step (s)", f"{shape} vs LoRA", f"{shape} peak MiB", f"{shape} layers in backward"]
        rows = []
        for name in TRAIN_SYSTEMS:
            row = [name, f"{results.parameters[name]:,}" if name in results.parameters else "n/a"]
            for t in results.training.values():
                if name in t["errors"] or name not in t["median_s"]:
                    row += ["failed" if name in t["errors"] else "n/a", "—", "—", "—"]
                    continue
                mem = t["peak_memory_bytes"].get(name)
                row += [common.fmt(t["median_s"][name], "{:.3f}"), common.fmt(t["ratio_vs_lora"].get(name), "{:.3f}x"),
                        common.fmt(None if mem is None else mem / 2**20, "{:.0f}"),
                        str(t["backward_layers"].get(name, "n/a"))]
            rows.append(row)
        out.append(common.markdown_table(header, rows))
        out.append("")
        out.append("Peak MiB = peak tensor memory a training step allocates on top of the loaded model "
                   "(activations, gradients, temporaries; CPU: from torch.profiler's allocator events, CUDA: "
                   "`max_memory_allocated`) plus the persistent trainable state (parameters and the two AdamW "
                   "moments). \"Layers in backward\" counts the attention backward kernels of one step.")
        out.append("")
    out.append("#### Targets")
    out.append("")
    out.append(common.markdown_table(["target", "measured", "status"], targets(results)))
    if results.notes:
        out.append("")
        out += [f"* {note}" for note in results.notes]
    return "\n".join(out)


def plot(results: Results, path: Path) -> None:
    """Bar charts of generation tokens/s and training step time into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("generation", "training") if getattr(results, k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "generation":
            groups = list(results.generation)
            names = [n for n in GEN_SYSTEMS if any(n in results.generation[g]["tokens_per_s"] for g in groups)]
            values = {g: results.generation[g]["tokens_per_s"] for g in groups}
            ax.set_title("Generation throughput (higher is better)")
            ax.set_ylabel("new tokens / s")
            labels = [g.replace("batch", "batch ") for g in groups]
        else:
            groups = list(results.training)
            names = [n for n in TRAIN_SYSTEMS if any(n in results.training[g]["median_s"] for g in groups)]
            values = {g: results.training[g]["median_s"] for g in groups}
            ax.set_title("Training step time (lower is better)")
            ax.set_ylabel("seconds / step")
            labels = [f"batch {g} tokens" for g in groups]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, [values[g].get(name) or 0 for g in groups], width, label=name)
        ax.set_xticks(range(len(groups)), labels)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{results.settings['model']} on {results.machine['device']} "
                 f"({results.machine['cpu'] if results.machine['device'] == 'cpu' else results.machine.get('gpu')})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens, training on 8x64 only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per generation measurement")
    parser.add_argument("--prefill-rounds", type=int, default=None, help="rounds of the prefill-only measurement")
    parser.add_argument("--train-rounds", type=int, default=None, help="interleaved rounds, training on <= 64 tokens")
    parser.add_argument("--long-rounds", type=int, default=None, help="interleaved rounds, longer training shapes")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per generated row")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="training sequence lengths")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generation", "training"], help="parts to skip")
    parser.add_argument("--no-pyreft", action="store_true", help="do not run pyreft even if installed")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render (and with --update-docs, publish) results saved by --json")
    parser.add_argument("--update-docs", action="store_true",
                        help="write the tables into docs/benchmarks.md and the chart into docs/img/")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.prefill_rounds = args.prefill_rounds or (2 if args.quick else 3)
    args.train_rounds = args.train_rounds or (2 if args.quick else 3)
    args.long_rounds = args.long_rounds or 3
    args.new_tokens = args.new_tokens or (16 if args.quick else 32)
    args.lengths = args.lengths or ([64] if args.quick else [64, 256])
    return args


def main(argv: list[str] | None = None) -> Results:
    """Run the benchmark; returns (and optionally writes) the results."""
    args = parse_args(argv)
    if args.from_json:
        results = Results(**json.loads(args.from_json.read_text()))
        publish(results, args)
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = common.resolve_device(args.device), common.resolve_dtype(args.dtype)
    torch.manual_seed(0)
    base, tokenizer = common.load_model(args.model, device, dtype)
    peers = {"pyreft": None if args.no_pyreft else common.import_pyreft()}
    results = Results(
        machine=common.machine_info(device),
        settings={"model": args.model or "SmolLM2-135M-Instruct", "dtype": str(dtype).removeprefix("torch."),
                  "rounds": args.rounds, "prefill_rounds": args.prefill_rounds, "train_rounds": args.train_rounds,
                  "long_rounds": args.long_rounds, "new_tokens": args.new_tokens,
                  "lengths": args.lengths, "quick": args.quick},
    )
    if common.OPENMP_NOTE:
        results.notes.append(common.OPENMP_NOTE)
    if peers["pyreft"] is not None:
        results.notes.append(f"pyreft {common.package_version('pyreft')} / pyvene {common.package_version('pyvene')} "
                             "installed with --no-deps next to transformers "
                             f"{common.package_version('transformers')}; run unchanged (use_fast=False, "
                             "interventions in eval mode for generation).")
    elif not args.no_pyreft:
        results.notes.append("pyreft/pyvene are not installed: pyreft rows are skipped.")
    log(common.describe_machine(results.machine))
    if "generation" not in args.skip:
        generation_benchmark(base, tokenizer, device, args, results, peers)
    if "training" not in args.skip:
        training_benchmark(base, device, args, results, peers)
    results.machine["load_end"] = common.load_average()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results.__dict__, indent=1, default=str))
    publish(results, args)
    return results


def publish(results: Results, args: argparse.Namespace) -> None:
    """Print the Markdown report; with ``--update-docs`` also write it and the chart into ``docs/``."""
    text = render(results)
    print("\n" + text)
    if args.update_docs:
        chart = common.IMG / "benchmarks_throughput.png"
        with contextlib.suppress(ImportError):
            plot(results, chart)
            text += f"\n\n![throughput and training step time](img/{chart.name})"
        common.replace_section(common.DOCS / "benchmarks.md", "throughput", text)


if __name__ == "__main__":
    main()
