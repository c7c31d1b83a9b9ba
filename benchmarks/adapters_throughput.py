"""Generation throughput of mixed-adapter batches (reftlib named adapters).

Five systems generate the same number of new tokens for the same 8 prompts:

* ``mixed``: one batch of 8 rows spread over 4 adapters (``adapter_names=[...]``, 2 rows each);
* ``single``: the same 8 rows all on one adapter (``set_adapter``);
* ``base``: the base model without interventions (``model.generate``);
* ``separate``: the 4 adapters as 4 separate batches of 2 rows (what a server without per-row
  adapters has to do);
* ``base separate``: the base model on the same 4 batches of 2 rows, a reference for how much
  batching 8 rows instead of 4 x 2 gains on the device without any adapters (the ceiling of
  ``mixed / separate``).

Systems are interleaved with :func:`common.interleaved` (the order rotates every repetition,
one warm-up call each is not timed) and the report gives medians: tokens/s per system and the
median of the per-repetition ratios (paired, so a slow patch of a shared machine hits both sides
of a ratio). Process CPU time is reported next to wall time, because it is much less sensitive to
other jobs on a shared machine. Before timing, the mixed batch's tokens are checked to equal the
separate batches' tokens.

Usage::

    python benchmarks/adapters_throughput.py [--model PATH] [--device cpu|cuda] [--reps N]
        [--new-tokens N] [--mode prompt|prompt+generated] [--threads N] [--out FILE]

The default (SmolLM2-135M-Instruct from :func:`reftlib.offline.load_default_model`, CPU, 5
repetitions of 64 new tokens) takes about 10 minutes on 2 otherwise idle CPU cores, and writes
its report into ``docs/benchmarks_adapters.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # first: may set OMP_WAIT_POLICY before torch is imported
import torch

import reftlib
from reftlib.offline import DEFAULT_MODEL_NAME

ADAPTERS = ["a0", "a1", "a2", "a3"]
ROWS = ["a0", "a1", "a2", "a3", "a0", "a1", "a2", "a3"]  # 8 rows, 2 per adapter, interleaved
SYSTEMS = {
    "mixed": "8 rows over 4 adapters, one batch",
    "single": "8 rows on 1 adapter",
    "base": "8 rows, no interventions",
    "separate": "4 batches of 2 rows, one per adapter",
    "base separate": "base model on the same 4 batches of 2 rows (reference)",
}
PAIRS = [("mixed", "single"), ("mixed", "separate"), ("mixed", "base"), ("single", "base"), ("base", "base separate")]
TARGETS = {("mixed", "single"): 0.9, ("mixed", "separate"): 3.0}


def build_adapters(model: torch.nn.Module) -> reftlib.ReftModel:
    """Four LoReFT rank-4 adapters at block_output of four layers, with random non-trivial weights."""
    layers = model.config.num_hidden_layers
    reft_model = None
    for name, fraction in zip(ADAPTERS, (0.2, 0.4, 0.6, 0.8)):
        config = reftlib.ReftConfig({"layer": round((layers - 1) * fraction), "component": "block_output",
                                     "low_rank_dimension": 4})
        if reft_model is None:
            reft_model = reftlib.get_reft_model(model, config, adapter_name=name)
        else:
            reft_model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reft_model.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.1)
    reft_model.set_adapter(ADAPTERS[0])
    return reft_model.eval()


def log(text: str) -> None:
    """Progress messages go to stderr; the report goes to stdout."""
    print(text, file=sys.stderr, flush=True)


def with_cpu_time(fn: Callable[[], torch.Tensor], store: list[float]) -> Callable[[], torch.Tensor]:
    """``fn`` that also appends the process CPU seconds of each call to ``store``."""

    def call() -> torch.Tensor:
        start = time.process_time()
        out = fn()
        store.append(time.process_time() - start)
        return out

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generation throughput of mixed-adapter batches.")
    parser.add_argument("--model", default=None, help=f"from_pretrained folder (default: offline {DEFAULT_MODEL_NAME})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per system (after one warm-up)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens generated per row")
    parser.add_argument("--mode", default="prompt", choices=["prompt", "prompt+generated"],
                        help="where the interventions act (reftlib generate mode); positions are 'l1'")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(common.DOCS / "benchmarks_adapters.md"),
                        help="Markdown file the report is written to ('' to only print it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    if common.OPENMP_NOTE:
        log(common.OPENMP_NOTE)

    model, tok = common.load_model(args.model, device, torch.float32)
    reft_model = build_adapters(model)
    batch = tok(common.chat_prompts(tok, common.QUESTIONS), return_tensors="pt", padding=True).to(device)
    width = batch["input_ids"].shape[1]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id)
    groups = {name: [i for i, row in enumerate(ROWS) if row == name] for name in ADAPTERS}

    def mixed() -> torch.Tensor:
        return reft_model.generate(**batch, unit_locations="l1", mode=args.mode, adapter_names=ROWS, **gen)

    def single() -> torch.Tensor:
        reft_model.set_adapter(ADAPTERS[0])
        return reft_model.generate(**batch, unit_locations="l1", mode=args.mode, **gen)

    def base() -> torch.Tensor:
        return model.generate(**batch, **gen)

    def separate(with_adapters: bool = True) -> torch.Tensor:
        out = torch.empty(len(ROWS), width + args.new_tokens, dtype=torch.long, device=device)
        for name, rows in groups.items():
            sub = {key: value[rows] for key, value in batch.items()}
            if with_adapters:
                reft_model.set_adapter(name)
                out[rows] = reft_model.generate(**sub, unit_locations="l1", mode=args.mode, **gen)
            else:
                out[rows] = model.generate(**sub, **gen)
        return out

    info = common.machine_info(device)
    cpu: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    with torch.inference_mode():
        plain = {"mixed": mixed, "single": single, "base": base, "separate": separate,
                 "base separate": lambda: separate(with_adapters=False)}
        same = torch.equal(mixed(), separate())  # the correctness check is also the warm-up of these two
        for name in ("single", "base", "base separate"):
            plain[name]()  # warm-up, not timed
        systems = {name: with_cpu_time(plain[name], cpu[name]) for name in SYSTEMS}
        timings = common.interleaved(systems, args.reps, device, warmup=0, log=log)
    info["load_end"] = common.load_average()
    if timings.errors:
        raise SystemExit(f"systems failed: {timings.errors}")

    tokens = len(ROWS) * args.new_tokens
    rows = []
    for name, description in SYSTEMS.items():
        seconds = timings.seconds[name]
        rows.append([name, description, f"{tokens / statistics.median(seconds):.1f}",
                     f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f})",
                     f"{statistics.median(cpu[name]):.2f}"])
    systems_table = common.markdown_table(
        ["system", "rows and adapters", "new tokens/s (median)", "wall s per run: median (min-max)",
         "CPU s per run (median)"], rows)
    ratio_rows = []
    for a, b in PAIRS:
        wall = timings.paired_ratio(a, b)
        cpu_ratio = statistics.median(tb / ta for ta, tb in zip(cpu[a], cpu[b]))
        target = TARGETS.get((a, b))
        verdict = "" if target is None else f">= {target:g}x: {'met' if wall >= target else 'MISSED'}"
        ratio_rows.append([f"{a} / {b}", f"{wall:.2f}x", f"{cpu_ratio:.2f}x", verdict])
    ratios_table = common.markdown_table(
        ["tokens/s ratio (median of per-repetition ratios)", "wall clock", "process CPU time", "target (wall clock)"],
        ratio_rows)
    layers = [rep.layer for name in ADAPTERS for rep in reft_model.reft_configs[name].representations]
    options = " ".join(f"{flag} {value}" for flag, value, default in (
        ("--model", args.model, None), ("--device", args.device, "cpu"), ("--reps", args.reps, 5),
        ("--new-tokens", args.new_tokens, 64), ("--mode", args.mode, "prompt"), ("--threads", args.threads, None),
    ) if value != default)
    report = (
        "# Benchmark: mixed-adapter batches\n\n"
        f"`python benchmarks/adapters_throughput.py{' ' + options if options else ''}`\n\n"
        f"*Machine:* {common.describe_machine(info)}\n\n"
        f"*Setup:* {args.model or DEFAULT_MODEL_NAME} (float32); 8 chat prompts ({width} tokens after left "
        f"padding), greedy, {args.new_tokens} new tokens per row; generate mode `{args.mode}` at positions `l1`; "
        f"4 LoReFT rank-4 adapters at `block_output` of layers {layers}; mixed rows {ROWS}. {args.reps} timed "
        "repetitions per system after one warm-up, interleaved with the order rotated every repetition. "
        f"Mixed-batch tokens equal the separate batches' tokens: **{same}**.\n\n"
        f"{systems_table}\n\n{ratios_table}\n\n"
        "*Reading the numbers:* `mixed / single` is the cost of selecting adapters per row (boolean row masks "
        "inside the hooks; the rest of the batch is the same work). `mixed / separate` is what one mixed batch "
        "saves over one batch per adapter; it depends on how much cheaper a decode step of 2 rows is than one "
        "of 8 on the device, not on reftlib: `base / base separate` is the same saving without adapters. "
        "Process CPU time counts all threads of the benchmark process; with several threads it includes their "
        "spin-waits, but other jobs on the machine hardly change it.\n"
    )
    print(report)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
        log(f"written to {args.out}")
    if not same:
        log("ERROR: the mixed batch did not reproduce the separate batches' tokens")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
