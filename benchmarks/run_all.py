"""Run reftlib's benchmarks one after the other, each in a fresh process, and update the docs.

    python benchmarks/run_all.py [--quick] [--threads N] [--model PATH] [--device cpu|cuda] [--no-docs]

Runs ``throughput.py`` (generation, training step, memory, parameters) and ``emoji_training.py``
(end-to-end Trainer time of the emoji tutorial), writes their raw results to
``benchmarks/results/*.json`` and, unless ``--no-docs``, their tables into ``docs/benchmarks.md``
and the chart into ``docs/img/``. The emoji benchmark always uses the default SmolLM2 model.
Default: about 15 minutes on 2 idle CPU cores (``--quick``: about 4).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str]) -> int:
    """Run ``script`` with ``args`` in a fresh interpreter; returns its exit status."""
    command = [sys.executable, str(HERE / script), *args]
    print(f"$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    status = subprocess.call(command)
    print(f"# {script}: exit {status} after {time.perf_counter() - start:.0f} s", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks; returns a non-zero status if either failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (throughput --quick, 20 emoji epochs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both benchmarks")
    parser.add_argument("--model", default=None, help="local model folder for throughput.py")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (throughput.py)")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    common = ["--threads", str(args.threads)] if args.threads else []
    docs = [] if args.no_docs else ["--update-docs"]
    throughput = [*common, *docs, "--device", args.device, "--json", str(results / "throughput.json")]
    if args.quick:
        throughput.append("--quick")
    if args.model:
        throughput += ["--model", args.model]
    emoji = [*common, *docs, "--json", str(results / "emoji_training.json")]
    if args.quick:
        emoji += ["--epochs", "20", "--pyreft-steps", "2", "--raw-reps", "3"]
    status = run("throughput.py", throughput)
    status |= run("emoji_training.py", emoji)
    return status


if __name__ == "__main__":
    sys.exit(main())
