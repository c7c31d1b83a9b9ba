"""Train a tiny Llama's interventions with FSDP2 (``reftlib.shard_reft_model``); run by tests/test_fsdp.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py OUT`` trains on two CPU
processes (gloo), each on half of the global batch, and writes to ``OUT``:

* ``<method>/final``: the interventions after :data:`STEPS` steps, saved from the gathered state
  dict by rank 0, for ``method`` in :data:`METHODS` and ``loreft_checkpointed`` (activation
  checkpointing on);
* ``loreft_ckpt``: the interventions and the optimizer after :data:`RESUME_AT` steps, and
  ``loreft_resumed/final``: a fresh sharded model loaded from it and trained to :data:`STEPS`;
* ``rank<r>.json``: the per-step losses (averaged over processes), the parameter elements this
  process holds, the outputs of the trained LoReFT model on :func:`probe` (rank 0) and the
  errors raised for bad input.

:func:`train` called in-process with ``distributed=False`` is the single-process reference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import end_worker

METHODS = ("loreft", "lofit")
STEPS = 4
RESUME_AT = 2
GLOBAL_BATCH, LENGTH = 4, 8  # every step trains on the same 4 full-length rows: equal tokens per process
LR, MOMENTUM = 0.1, 0.9  # SGD with momentum: linear in the gradients, and with optimizer state to resume


def base_model():
    """The tiny Llama every run starts from (deterministic)."""
    import torch
    from tiny_models import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():  # a larger head makes the loss depend visibly on the interventions
        weight = model.lm_head.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
    return model


def build(method: str):
    """The base model with LoReFT at two layers, or LoFiT head offsets on two layers (deterministic)."""
    import torch

    import reftlib

    model = base_model()
    torch.manual_seed(7)
    if method.startswith("loreft"):
        reps = [{"layer": layer, "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)} for layer in (0, 2)]
    else:
        reps = [
            {"layer": 0, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1, 3],
                                                                                                  init_std=0.1)},
            {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[2],
                                                                                                  init_std=0.1)},
        ]
    reft_model = reftlib.get_reft_model(model, reps)
    if method == "loreft_checkpointed":
        reft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reft_model.train()
    return reft_model


def batch():
    """The global batch: ``input_ids`` ``[GLOBAL_BATCH, LENGTH]``, no padding; each token is its own label."""
    import torch

    return torch.randint(0, 128, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


def probe():
    """A batch of two unseen rows the trained models are compared on."""
    import torch

    return torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(1))


def positions(method: str) -> str | None:
    return "f2+l2" if method.startswith("loreft") else None  # LoFiT acts at every position


def make_optimizer(reft_model):
    import torch

    return torch.optim.SGD([p for p in reft_model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)


def train(reft_model, optimizer, method: str, steps: range, *, distributed: bool) -> list[float]:
    """Run ``steps``; returns each step's loss on the global batch (averaged over processes)."""
    import torch
    import torch.distributed as dist

    ids = batch()
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
        ids = ids.chunk(world)[rank]
    losses = []
    for _step in steps:
        out = reft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                         unit_locations=positions(method))
        out.loss.backward()  # FSDP2 averages the gradients over processes: the gradient of the global mean
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach().clone()
        if distributed:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def run_single(method: str) -> tuple[list[float], dict]:
    """Single-process reference: losses and the adapter's tensors (as saved) after :data:`STEPS` steps."""
    import torch

    from reftlib.io import get_adapter_state_dict

    torch.set_num_threads(1)
    reft_model = build(method)
    losses = train(reft_model, make_optimizer(reft_model), method, range(STEPS), distributed=False)
    return losses, get_adapter_state_dict(reft_model)


def _save(reft_model, folder: Path, optimizer=None) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    import reftlib

    state = reftlib.gather_reft_state_dict(reft_model)  # every process: a collective
    reft_model.save_pretrained(folder, state_dict=state, is_main_process=dist.get_rank() == 0)
    if optimizer is not None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(reft_model, optimizer, options=options)
        if dist.get_rank() == 0:
            torch.save(optim_state, folder / "optimizer.pt")
    dist.barrier()


def _errors(sharded) -> dict[str, str]:
    """The messages of the ReftConfigErrors raised for bad input under FSDP."""
    from transformers import TrainingArguments

    import reftlib
    from reftlib.training import ReftTrainer

    found = {}
    for what, call in {
        "shard_twice": lambda: reftlib.shard_reft_model(sharded),
        "trainer_with_presharded_model": lambda: ReftTrainer(
            model=sharded, args=TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]),
        ),
    }.items():
        try:
            call()
            found[what] = ""
        except reftlib.ReftConfigError as exc:
            found[what] = str(exc)
    return found


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    import reftlib

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report: dict = {"rank": rank, "world_size": dist.get_world_size(), "losses": {}}

    for method in (*METHODS, "loreft_checkpointed"):
        reft_model = reftlib.shard_reft_model(build(method), mesh=mesh)
        optimizer = make_optimizer(reft_model)  # after sharding: over the (sharded) intervention parameters
        report["losses"][method] = train(reft_model, optimizer, method, range(STEPS), distributed=True)
        _save(reft_model, out / method / "final")
        if method == "loreft":
            report["held"] = {
                part: {"local": sum(p.to_local().numel() for p in module.parameters()),
                       "full": sum(p.numel() for p in module.parameters())}
                for part, module in (("base", reft_model.model), ("interventions", reft_model.adapters))
            }
            report["held"]["base_shapes"] = [list(p.shape) for p in reft_model.model.parameters()]
            with torch.no_grad():
                ids = probe()
                logits = reft_model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    unit_locations=positions(method)).logits
            report["probe_logits"] = logits.tolist()
            report["errors"] = _errors(reft_model)

    # Checkpoint at RESUME_AT, then a fresh model and optimizer resume from the folder alone.
    reft_model = reftlib.shard_reft_model(build("loreft"), mesh=mesh)
    optimizer = make_optimizer(reft_model)
    train(reft_model, optimizer, "loreft", range(RESUME_AT), distributed=True)
    _save(reft_model, out / "loreft_ckpt", optimizer)
    del reft_model, optimizer
    resumed = reftlib.shard_reft_model(build("loreft"), mesh=mesh)
    optimizer = make_optimizer(resumed)
    reftlib.load_sharded_intervention_weights(resumed, out / "loreft_ckpt")
    optim_state = torch.load(out / "loreft_ckpt" / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(resumed, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    report["losses"]["loreft_resumed"] = train(resumed, optimizer, "loreft", range(RESUME_AT, STEPS), distributed=True)
    _save(resumed, out / "loreft_resumed" / "final")

    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    end_worker()
