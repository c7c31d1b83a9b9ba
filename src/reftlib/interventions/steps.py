"""The post-optimizer-step hook: one place where modules react to their parameters being updated.

Some interventions keep their parameters on a manifold or cache values derived from them (LoReFT's
rotation puts ``raw`` back on orthonormal columns of fixed length and drops its cached ``R``).
They implement ``after_optimizer_step()`` and call :func:`track` on themselves; after every
``step()`` of any ``torch.optim`` optimizer (reftlib's trainers, ``accelerate``, a hand-written
loop alike), each tracked module that has a parameter in that optimizer *with a gradient* gets its
``after_optimizer_step()`` called. Modules the step did not update are left alone.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["track", "tracked_modules"]

_tracked: weakref.WeakSet = weakref.WeakSet()


def track(module: nn.Module) -> None:
    """Call ``module.after_optimizer_step()`` after every optimizer step that updates one of its parameters."""
    _tracked.add(module)


def tracked_modules(root: nn.Module) -> list[nn.Module]:
    """The tracked modules inside ``root``, in ``root.modules()`` order (the same on every process)."""
    return [module for module in root.modules() if module in _tracked]


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if not _tracked:
        return
    stepped = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    updated = []
    for module in list(_tracked):
        params = list(module.parameters())
        found = [stepped[id(p)] for p in params if id(p) in stepped and p.grad is not None]
        if found:
            # an intervention and the rotation inside it share their first parameter: the inner one first
            updated.append(((min(found), len(params)), module))
    # In the optimizer's parameter order, the same on every process (the set's order is not): the
    # step of a module sharded by FSDP2 gathers its parameters, and collectives must match.
    for _order, module in sorted(updated, key=lambda item: item[0]):
        module.after_optimizer_step()


register_optimizer_step_post_hook(_after_optimizer_step)
