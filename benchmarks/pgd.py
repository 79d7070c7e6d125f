"""The projected gradient descent the slowdown suite attacks with, written once for every row."""

from __future__ import annotations

from collections.abc import Callable

import torch


def pgd(
    pixels: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    steps: int,
    seed: int,
    batch: int = 50,
) -> torch.Tensor:
    """L-inf PGD on [0, 1] pixels (Madry et al.): from a seeded random start within `eps`,
    `steps` signed-gradient steps of 2.5 eps / steps that *decrease* `loss_of(pixels)`, each
    projected back into the eps ball and the valid pixel range; `batch` images at a time."""
    step_size = 2.5 * eps / steps
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(pixels), batch):
        clean = pixels[start : start + batch]
        delta = (torch.rand(clean.shape, generator=generator) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss_of((clean + delta).clamp(0, 1)), delta)
            with torch.no_grad():
                delta = (delta - step_size * grad.sign()).clamp(-eps, eps)
                delta = (clean + delta).clamp(0, 1) - clean
        out.append((clean + delta.detach()).clamp(0, 1))
    return torch.cat(out)
