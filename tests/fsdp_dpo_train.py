"""DPO of a tiny Llama's LoReFT interventions under FSDP2 (``reftlib.shard_reft_model``); run by tests/test_fsdp_dpo.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_dpo_train.py OUT`` trains on two
CPU processes (gloo), each on half of the global batch of preference pairs, with reftlib's DPO
loss (:func:`reftlib.training.sequence_logps` and :func:`reftlib.training.dpo_loss`, the functions
``ReftDPOTrainer.compute_loss`` calls). The reference policy is the same sharded model inside
``reft_model.disable_interventions()`` under ``torch.no_grad()``, as in the trainer. It writes to
``OUT``:

* ``final``: the interventions after :data:`STEPS` steps (gathered, saved by rank 0);
* ``rank<r>.json``: the per-step DPO losses (averaged over processes) and, for the first step,
  the reference and policy log-probabilities of this process's rows.

:func:`run_single` is the single-process reference on the whole global batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import end_worker

STEPS = 4
PAIRS, PROMPT, ANSWER = 4, 5, 3  # the global batch: 4 pairs, 5 prompt tokens, 3 answer tokens each
BETA = 0.1
LR, MOMENTUM = 0.05, 0.9


def build():
    """LoReFT rank 4 at layers 0 and 2 of :func:`fsdp_train.base_model` (deterministic)."""
    import torch
    from fsdp_train import base_model

    import reftlib

    model = base_model()
    torch.manual_seed(7)
    reps = [{"layer": layer, "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)} for layer in (0, 2)]
    reft_model = reftlib.get_reft_model(model, reps)
    reft_model.train()
    return reft_model


def pairs():
    """``(prompt, chosen, rejected)`` token tensors ``[PAIRS, PROMPT]``, ``[PAIRS, ANSWER]``, ``[PAIRS, ANSWER]``."""
    import torch

    g = torch.Generator().manual_seed(3)
    return (torch.randint(6, 128, (PAIRS, PROMPT), generator=g), torch.randint(6, 128, (PAIRS, ANSWER), generator=g),
            torch.randint(6, 128, (PAIRS, ANSWER), generator=g))


def dpo_batch(rows: slice | None = None) -> dict:
    """The pairs ``rows`` laid out as ``ReftDPODataCollator`` does: chosen rows first, then the rejected ones.

    ``input_ids``/``attention_mask``/``labels`` ``[2n, PROMPT + ANSWER]`` (labels ``-100`` on the
    prompt) and ``intervention_locations`` ``[2n, 2, 1]``: both interventions at the last prompt token.
    """
    import torch

    from reftlib.training import IGNORE_INDEX

    prompt, chosen, rejected = (t[rows] if rows is not None else t for t in pairs())
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE_INDEX
    locations = torch.full((ids.shape[0], 2, 1), PROMPT - 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "intervention_locations": locations}


def rank_rows(rank: int, world: int) -> slice:
    """The pairs of process ``rank``: equal, contiguous parts of the global batch."""
    per = PAIRS // world
    return slice(rank * per, (rank + 1) * per)


def dpo_step(reft_model, batch: dict) -> tuple:
    """reftlib's DPO loss on one batch: ``(loss, policy log-probs, reference log-probs)``.

    The same calls as ``ReftDPOTrainer.compute_loss``: the reference pass is the model itself with
    its interventions switched off, without gradients.
    """
    import torch

    from reftlib.training import dpo_loss, sequence_logps

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    with torch.no_grad(), reft_model.disable_interventions():
        reference = sequence_logps(reft_model, inputs, labels)
    policy = sequence_logps(reft_model, inputs, labels)
    n = labels.shape[0] // 2
    loss, _stats = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=BETA)
    return loss, policy.detach(), reference


def make_optimizer(reft_model):
    import torch

    return torch.optim.SGD([p for p in reft_model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)


def train(reft_model, *, distributed: bool) -> tuple[list[float], list[float], list[float]]:
    """:data:`STEPS` steps; the losses on the global batch and the first step's policy/reference log-probs."""
    import torch.distributed as dist

    rows = rank_rows(dist.get_rank(), dist.get_world_size()) if distributed else None
    batch = dpo_batch(rows)
    optimizer = make_optimizer(reft_model)  # after sharding: over the (sharded) intervention parameters
    losses, first = [], None
    for _step in range(STEPS):
        loss, policy, reference = dpo_step(reft_model, batch)
        loss.backward()  # FSDP2 averages the gradients: the gradient of the mean over all pairs
        optimizer.step()
        optimizer.zero_grad()
        if first is None:
            first = (policy.tolist(), reference.tolist())
        loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # equal pairs per process: the global mean
        losses.append(loss.item())
    return losses, *first


def run_single() -> tuple[list[float], list[float], list[float], dict]:
    """Single-process reference: losses, first-step log-probs and the adapter's tensors after :data:`STEPS` steps."""
    import torch

    from reftlib.io import get_adapter_state_dict

    torch.set_num_threads(1)
    reft_model = build()
    losses, policy, reference = train(reft_model, distributed=False)
    return losses, policy, reference, get_adapter_state_dict(reft_model)


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import reftlib

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    reft_model = reftlib.shard_reft_model(build(), mesh=mesh)
    losses, policy, reference = train(reft_model, distributed=True)
    state = reftlib.gather_reft_state_dict(reft_model)  # every process: a collective
    reft_model.save_pretrained(out / "final", state_dict=state, is_main_process=rank == 0)
    dist.barrier()
    report = {"rank": rank, "world_size": dist.get_world_size(), "losses": losses, "policy_logps": policy,
              "reference_logps": reference}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    end_worker()
