"""Train a tiny Llama's interventions under DeepSpeed ZeRO-3 on the CPU; run by tests/test_zero3.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/zero3_train.py OUT`` trains on two CPU
processes (gloo) with ``deepspeed.initialize`` (ZeRO stage 3: every parameter partitioned over the
processes, the frozen base's and the interventions'), each process on half of the global batch,
calling :func:`reftlib.distributed.after_deepspeed_step` after every ``engine.step()``, and writes:

* ``<method>/final``: the interventions after :data:`fsdp_train.STEPS` steps, gathered with
  :func:`reftlib.gather_reft_state_dict` and saved by rank 0, for ``method`` in ``fsdp_train.METHODS``;
* ``loreft_ckpt``: DeepSpeed's checkpoint after ``RESUME_AT`` steps, and ``loreft_resumed/final``:
  a fresh engine loaded from it and trained to the last step;
* ``rank<r>.json``: the per-step losses (averaged over processes) and the base/intervention
  parameter elements this process holds.

The model, batch, positions, optimizer (SGD with momentum) and steps are those of ``fsdp_train``,
whose ``run_single`` is the single-process reference. (The Trainer's ``deepspeed=`` path needs a
GPU: on the CPU, accelerate's state sees one process; see ``test_devices.py``.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_train import GLOBAL_BATCH, METHODS, RESUME_AT, STEPS, batch, build, make_optimizer, positions
from helpers import end_worker

CONFIG = {
    "train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the reference does not clip
    "steps_per_print": 10**9,
}


def engine_for(method: str):
    import deepspeed

    reft_model = build(method)  # the hooks read the interventions' parameters: ZeRO-3 gathers them on access
    engine, _optimizer, _, _ = deepspeed.initialize(model=reft_model, optimizer=make_optimizer(reft_model),
                                                    config=CONFIG)
    return engine


def train(engine, method: str, steps: range) -> list[float]:
    """Run ``steps`` on this process's half of the global batch; the losses averaged over processes."""
    import torch
    import torch.distributed as dist

    import reftlib

    ids = batch().chunk(dist.get_world_size())[dist.get_rank()]
    losses = []
    for _step in steps:
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, unit_locations=positions(method))
        engine.backward(out.loss)  # DeepSpeed averages the gradients over processes
        engine.step()
        reftlib.distributed.after_deepspeed_step(engine.module)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def save(engine, folder: Path) -> None:
    import torch.distributed as dist

    import reftlib

    state = reftlib.gather_reft_state_dict(engine.module)  # every process: a collective
    engine.module.save_pretrained(folder, state_dict=state, is_main_process=dist.get_rank() == 0)
    dist.barrier()


def main() -> None:
    import torch
    import torch.distributed as dist

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    report: dict = {"losses": {}}
    for method in METHODS:
        engine = engine_for(method)
        if method == "loreft":
            first = train(engine, method, range(RESUME_AT))
            engine.save_checkpoint(str(out / "loreft_ckpt"))
            report["losses"][method] = first + train(engine, method, range(RESUME_AT, STEPS))
            model = engine.module
            report["held"] = {
                part: {"local": sum(p.ds_tensor.numel() for p in module.parameters()),
                       "full": sum(p.ds_numel for p in module.parameters())}
                for part, module in (("base", model.model), ("interventions", model.adapters))
            }
        else:
            report["losses"][method] = train(engine, method, range(STEPS))
        save(engine, out / method / "final")
    resumed = engine_for("loreft")
    resumed.load_checkpoint(str(out / "loreft_ckpt"))
    report["losses"]["loreft_resumed"] = train(resumed, "loreft", range(RESUME_AT, STEPS))
    save(resumed, out / "loreft_resumed" / "final")
    rank = dist.get_rank()
    report.update(rank=rank, world_size=dist.get_world_size())
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    end_worker()
