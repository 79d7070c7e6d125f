"""Cheap submodule lookups for the modules dynify builds.

`nn.Module` keeps submodules in `_modules`, so every `self.child` misses the instance dictionary
and falls back to the Python-level `Module.__getattr__`. A traced graph reaches each layer through
its whole path (`getattr(self.layer1, "0").conv1`), so a batch-1 forward of a CIFAR ResNet-44
made by `torch.fx` spends ~0.3 ms (6 %) on those fallbacks, which the hand-written original does
not (measured in benchmarks/block_gates.md). Dynamic models exist to save time at batch 1, so the
containers dynify builds also keep their children in their instance dictionary, where normal
attribute lookup finds them first.

Only dynify's own modules and the containers `torch.fx` creates are touched, never a user's
module classes; `_modules` stays the source of truth (state dicts, `named_modules`, `.to()`).
Replacing a child with `setattr` keeps the two in step (`nn.Module.__setattr__` drops the
instance entry); other structural edits after conversion should call `bind_children` again.
"""

from __future__ import annotations

import torch
from torch import nn


def _owned(module: nn.Module) -> bool:
    cls = type(module)
    return (
        isinstance(module, torch.fx.GraphModule)
        or cls is nn.Module  # the path containers torch.fx creates (`layer1`, `0`, ...)
        or cls.__module__.startswith("dynify.runtime.")
    )


def bind_children(model: nn.Module) -> nn.Module:
    """Make every child of the modules dynify owns an instance attribute too; returns `model`."""
    for module in model.modules():
        if not _owned(module):
            continue
        for name, child in module._modules.items():
            if child is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = child
    return model
