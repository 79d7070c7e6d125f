"""Spatial masks forced to a chosen MAC-weighted density, for measuring the sparse path.

A learned mask's density depends on the image and the threshold; timing the gather-run-scatter
path against the dense branch needs masks of a known density instead. `force_mask_density`
sets one fixed mask per masked block (the same for every sample of a batch) and
`force_mask_density(dyn, None)` hands the decision back to the mask units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dynify.errors import InputError
from dynify.runtime.model import DynamicModel
from dynify.runtime.spatial_masks import SpatialMaskModel


def as_mask_model(dyn: DynamicModel) -> SpatialMaskModel:
    if not isinstance(dyn, SpatialMaskModel):
        raise InputError(
            f"Forced mask densities need a spatial-masks model, not a {dyn.strategy!r} one; "
            'convert with dynify.convert(model, "spatial-masks", ...).'
        )
    return dyn


def density_masks(dyn: DynamicModel, density: float, seed: int = 0) -> list[Tensor]:
    """One [1, h, w] bool mask per masked block, with a MAC-weighted density of `density`.

    Region: random tiles; the blocks are visited from the coarsest tiles to the finest, each
    carrying its rounding error over to the next (a 7x7 map is one tile at tile 7, all on or
    all off), so the finest maps absorb what the coarse ones could not realise and the
    MAC-weighted density lands on the target. Pixel: a smooth random blob mask thresholded at
    the density quantile, since learned masks are spatially coherent and random pixels dilate
    to nearly everything. The same seed gives the same masks.
    """
    model = as_mask_model(dyn)
    if not 0.0 <= density <= 1.0:
        raise InputError(f"A mask density is a fraction between 0 and 1, got {density}.")
    gen = torch.Generator().manual_seed(seed)
    wrappers = model.wrappers
    masks: list[Tensor] = [torch.empty(0)] * len(wrappers)
    carry = 0.0  # MACs still owed to (or over) the target

    def tile_macs(k: int) -> float:
        h, w = wrappers[k].units()
        return wrappers[k].branch_macs / (h * w)

    for k in sorted(range(len(wrappers)), key=tile_macs, reverse=True):
        wrapper = wrappers[k]
        h, w = wrapper.units()
        if model.granularity == "region":
            unit = tile_macs(k)
            wanted = density * wrapper.branch_macs + carry
            count = max(0, min(h * w, int(wanted / unit + 0.5)))
            carry = wanted - count * unit
            flat = torch.zeros(h * w, dtype=torch.bool)
            flat[torch.randperm(h * w, generator=gen)[:count]] = True
            masks[k] = flat.view(1, h, w)
        else:
            low = torch.rand(1, 1, max(2, h // 8), max(2, w // 8), generator=gen)
            smooth = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
            if density >= 1.0:
                masks[k] = torch.ones(1, h, w, dtype=torch.bool)
            elif density <= 0.0:
                masks[k] = torch.zeros(1, h, w, dtype=torch.bool)
            else:
                masks[k] = smooth < torch.quantile(smooth.flatten(), density)
    return masks


def mac_weighted_density(dyn: DynamicModel, masks: list[Tensor]) -> float:
    """The share of the masked blocks' MACs that `masks` keep (each block weighted by its
    dense branch's MACs)."""
    model = as_mask_model(dyn)
    wrappers = model.wrappers
    if len(masks) != len(wrappers):
        raise InputError(f"Expected one mask per masked block ({len(wrappers)}), got {len(masks)}.")
    kept = sum(
        float(m.float().mean()) * w.branch_macs for m, w in zip(masks, wrappers, strict=True)
    )
    return kept / sum(w.branch_macs for w in wrappers)


def force_mask_density(dyn: DynamicModel, density: float | None, *, seed: int = 0) -> float | None:
    """Fix every masked block's mask to `density_masks(dyn, density, seed)`, the same for every
    sample, and return the MAC-weighted density realised; `None` releases the masks (the mask
    units decide again) and returns None. Forced masks skip the mask units, so `last_macs`
    counts only the branch work that ran; `static()` still runs every block densely."""
    model = as_mask_model(dyn)
    if density is None:
        model.set_fixed_masks(None)
        return None
    masks = density_masks(model, density, seed)
    model.set_fixed_masks(masks)
    return mac_weighted_density(model, masks)
