"""Spatial masks forced to a MAC-weighted density (`dynify.force_mask_density`) and the
masked blocks timed at such densities (`dynify.bench_masked_blocks`): the density is the one
asked for, every sample of a batch gets the same masks, the sparse path equals the dense
branch masked, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch

import dynify
from dynify.errors import InputError


def masked(granularity: str = "region") -> dynify.DynamicModel:
    torch.manual_seed(0)
    options = dynify.SpatialMaskOptions(granularity=granularity)
    return dynify.convert("cifar_resnet20", "spatial-masks", weights="random", options=options)


@pytest.mark.parametrize("granularity", ["region", "pixel"])
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_forced_masks_realize_the_target_mac_weighted_density(granularity, density):
    dyn = masked(granularity).eval()
    realized = dynify.force_mask_density(dyn, density, seed=0)
    assert realized is not None
    # within one unit of the coarsest block: what rounding to whole tiles can leave
    coarsest = max(w.branch_macs / (w.units()[0] * w.units()[1]) for w in dyn.wrappers)
    assert abs(realized - density) <= coarsest / sum(w.branch_macs for w in dyn.wrappers)
    with torch.no_grad():
        dyn(dyn.random_input(3, torch.Generator().manual_seed(1)))
    densities = dyn.densities()
    assert torch.equal(densities[0], densities[1]) and torch.equal(densities[0], densities[2])
    weights = torch.tensor([w.branch_macs for w in dyn.wrappers], dtype=torch.float64)
    measured = float((densities[0].double() * weights).sum() / weights.sum())
    assert measured == pytest.approx(realized, abs=1e-6)
    assert dynify.force_mask_density(dyn, density, seed=0) == realized  # seeded
    assert dynify.force_mask_density(dyn, None) is None
    assert all(w.fixed_mask is None for w in dyn.wrappers)


def test_forced_density_refuses_other_strategies_and_bad_densities():
    exits = dynify.convert("cifar_resnet20", "early-exit", weights="random")
    with pytest.raises(InputError, match="spatial-masks"):
        dynify.force_mask_density(exits, 0.5)
    with pytest.raises(InputError, match="between 0 and 1"):
        dynify.force_mask_density(masked(), 1.5)


def test_bench_masked_blocks_times_each_density_and_restores_the_model():
    dyn = masked("region")
    thresholds = dyn.thresholds.clone()
    bench = dynify.bench_masked_blocks(dyn, [0.5, 0.0], runs=1)
    assert [(r.density, r.dense_fallback) for r in bench.rows] == [
        (0.5, False),
        (0.0, False),
        (1.0, True),
    ]
    assert bench.masked_blocks == len(dyn.wrappers) and 0 < bench.masked_share_of_macs < 1
    empty, full = bench.rows[1], bench.rows[2]
    assert empty.realized_density == 0.0 and empty.macs_fraction == 0.0
    assert full.realized_density == 1.0 and full.macs_fraction == 1.0  # the dense branches
    for row in bench.rows:
        assert row.max_abs_err_vs_dense_masked < 1e-4
        assert row.blocks_dense_ms > 0 and row.net_dense_ms > 0
    assert set(bench.to_dict()["rows"][0]) >= {"speedup", "cpu_speedup", "partial_blocks"}
    assert all(w.fixed_mask is None and w.dense_when_full for w in dyn.wrappers)
    assert torch.equal(dyn.thresholds, thresholds)
