"""Sharded training: FSDP2 (``reftlib.shard_reft_model``) vs DDP on 2 CPU processes (gloo), per-rank memory and step time.

``python benchmarks/distributed.py`` launches two ``torchrun`` jobs of two processes each, one per
strategy, one after the other, on the offline SmolLM2-135M-Instruct (``reftlib.offline``) with a
rank-4 LoReFT at the middle layer. Each process trains ``--steps`` steps (after one warm-up
step) on its own ``--batch`` rows of ``--length`` random tokens, and reports:

* **peak RSS**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process's lifetime peak. Both
  strategies load the whole model in every process before wrapping it, so this peak includes
  one full copy of the weights in both;
* **RSS after the steps**: the resident memory at the end (``/proc/self/statm``), when FSDP2
  holds only its shards again, and the same after ``malloc_trim(0)`` (freed heap pages returned
  to the OS: the full copy FSDP2 dropped may otherwise still count);
* **parameter bytes held**: the bytes of the parameter tensors this process owns at rest (for
  FSDP2 the local shards, ``DTensor.to_local()``; for DDP every parameter);
* **step time**: the median wall time of forward + backward + optimizer step.

It prints one table per strategy, the FSDP2/DDP ratios and the machine line, and writes
``benchmarks/results/distributed.json``. Each strategy runs in fresh processes, so ``ru_maxrss``
is its own. Run ``--help`` for the options; about 2-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # first: may set OMP_WAIT_POLICY before torch is imported
import torch

HERE = Path(__file__).resolve().parent

STRATEGIES = ("ddp", "fsdp2")
MB = 1024 * 1024


def _rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _trimmed_rss() -> int:
    """RSS after ``gc.collect()`` and glibc's ``malloc_trim(0)``: freed heap pages go back to the OS first.

    Without the trim, the full copy of the weights that FSDP2 frees after sharding may stay in the
    process's heap and count in its RSS. Returns the plain RSS where glibc is not available.
    """
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss_now()


def _param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameter tensors this process holds (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def worker(strategy: str, out: Path, steps: int, batch: int, length: int, rank_dim: int) -> None:
    """One process of one strategy: build, wrap, train, report to ``out/<strategy>-rank<r>.json``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    import reftlib
    from reftlib.offline import load_default_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_start = _rss_now()
    model, _tokenizer = load_default_model()
    rss_loaded = _rss_now()
    layer = model.config.num_hidden_layers // 2
    torch.manual_seed(0)
    reft_model = reftlib.get_reft_model(
        model, [{"layer": layer, "intervention": reftlib.LoreftIntervention(low_rank_dimension=rank_dim)}])
    reft_model.train()
    if strategy == "fsdp2":
        wrapped = reftlib.shard_reft_model(reft_model, mesh=init_device_mesh("cpu", (world,)))
    else:
        wrapped = DistributedDataParallel(reft_model)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(ids)

    def step() -> float:
        start = time.perf_counter()
        loss = wrapped(input_ids=ids, attention_mask=mask, labels=ids, unit_locations="f4+l4").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    step()  # warm-up
    times = [step() for _ in range(steps)]
    module = wrapped.module if strategy == "ddp" else wrapped
    report = {
        "strategy": strategy, "rank": rank, "world": world,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "rss_start": rss_start, "rss_loaded": rss_loaded, "rss_end": _rss_now(), "rss_end_trimmed": _trimmed_rss(),
        "param_bytes": _param_bytes(module), "param_bytes_full": sum(p.numel() * p.element_size()
                                                                     for p in model.parameters()),
        "trainable": sum(p.numel() for p in reft_model.adapters.parameters()),
        "step_times": times, "layer": layer,
    }
    (out / f"{strategy}-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(strategy: str, out: Path, args: argparse.Namespace) -> list[dict]:
    """Run ``strategy`` under torchrun with 2 processes; the per-rank reports."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", strategy,
               "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch),
               "--length", str(args.length), "--rank", str(args.rank)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [json.loads((out / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    parser.add_argument("--batch", type=int, default=2, help="rows per process (default 2)")
    parser.add_argument("--length", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--rank", type=int, default=4, help="LoReFT rank (default 4)")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.steps, args.batch, args.length, args.rank)
        return

    import tempfile

    if common.OPENMP_NOTE:
        print(common.OPENMP_NOTE)
    torch.set_num_threads(1)
    info = common.machine_info(torch.device("cpu"))
    info["torch_threads"] = 1  # per process; two processes
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: launch(s, Path(tmp), args) for s in STRATEGIES}
    info["load_end"] = common.load_average()

    rows = []
    summary = {}
    for strategy, ranks in results.items():
        for r in ranks:
            median = statistics.median(r["step_times"])
            rows.append([strategy, r["rank"], f"{r['rss_loaded'] / MB:.0f}", f"{r['peak_rss'] / MB:.0f}",
                         f"{r['rss_end'] / MB:.0f}", f"{r['rss_end_trimmed'] / MB:.0f}",
                         f"{r['param_bytes'] / MB:.1f}", f"{median:.2f}"])
        summary[strategy] = {
            "peak_rss": max(r["peak_rss"] for r in ranks), "rss_end": max(r["rss_end"] for r in ranks),
            "rss_end_trimmed": max(r["rss_end_trimmed"] for r in ranks),
            "param_bytes": max(r["param_bytes"] for r in ranks),
            "step_time": statistics.median(t for r in ranks for t in r["step_times"]),
        }
    first = results["ddp"][0]
    print(f"SmolLM2-135M-Instruct (fp32, {first['param_bytes_full'] / MB:.0f} MB of parameters), LoReFT rank "
          f"{args.rank} at layer {first['layer']} ({first['trainable']} trainable parameters), 2 processes (gloo), "
          f"{args.batch} x {args.length} tokens per process, {args.steps} timed steps after 1 warm-up")
    print(common.markdown_table(["strategy", "rank", "RSS after loading (MB)", "peak RSS (MB)",
                                 "RSS after the steps (MB)", "same, after malloc_trim (MB)",
                          "parameter bytes held (MB)", "step time, median (s)"], rows))
    ratios = {key: summary["fsdp2"][key] / summary["ddp"][key] for key in summary["ddp"]}
    print("FSDP2 / DDP (largest rank; step time: median over both ranks): "
          + ", ".join(f"{key} {value:.2f}" for key, value in ratios.items()))
    print(common.describe_machine(info))
    target = HERE / "results" / "distributed.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps({"machine": info, "args": vars(args) | {"out": None},
                                  "results": results, "summary": summary, "ratios": ratios}, indent=1, default=str))
    print(f"wrote {target.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
