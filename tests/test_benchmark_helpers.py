"""The benchmark scripts' own logic, on small models: operating points, which block a gate
wraps, blocks removed for the latency ceiling, and masks of a target density. Their published
figures are only as sound as these helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dynify
from dynify.models.cifar_resnet import BasicBlock, cifar_resnet20

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import block_gates
import spatial


def test_gate_operating_point_is_the_most_accurate_within_the_mac_cap():
    sweep = [
        {"calib_macs": 0.50, "calib_acc": 0.80},
        {"calib_macs": 0.60, "calib_acc": 0.85},
        {"calib_macs": 0.65, "calib_acc": 0.85},
        {"calib_macs": 0.80, "calib_acc": 0.90},
    ]
    assert block_gates.choose_threshold(sweep, 0.70) is sweep[1]  # a tie goes to fewer MACs
    assert block_gates.choose_threshold(sweep, 0.90) is sweep[3]
    assert block_gates.choose_threshold(sweep, 0.40) is sweep[0]  # none within: the cheapest


def test_mask_operating_point_is_the_cheapest_within_the_accuracy_margin():
    rows = [
        {"macs_fraction": 0.3, "accuracy": 0.85},
        {"macs_fraction": 0.5, "accuracy": 0.895},
        {"macs_fraction": 0.7, "accuracy": 0.90},
    ]
    assert spatial.choose_threshold(rows, static_acc=0.90, margin=0.01) is rows[1]
    assert spatial.choose_threshold(rows, static_acc=0.99, margin=0.01) is rows[-1]


@pytest.mark.parametrize("kind", ["function", "halting", "policy"])
def test_each_gate_maps_to_the_residual_block_it_wraps(kind):
    model = cifar_resnet20().eval()
    dyn = dynify.convert(model, "block-gates", torch.randn(1, 3, 32, 32), options={"gate": kind})
    blocks = [block_gates.gated_block(gate) for gate in dyn.gates]
    assert len(set(blocks)) == len(blocks)
    assert all(isinstance(model.get_submodule(b), BasicBlock) for b in blocks)
    if kind == "halting":  # a stage's first block is never gated under halting
        assert not any(b.endswith(".0") for b in blocks)
    ceiling = block_gates.without_blocks(model, blocks)
    assert not any(isinstance(ceiling.get_submodule(b), BasicBlock) for b in blocks)
    assert isinstance(model.get_submodule(blocks[0]), BasicBlock)  # the original is untouched
    # the ceiling computes what the gated model computes with those blocks skipped
    dyn.thresholds.fill_(0.0)  # every gate closed (halting: every stage halts at once)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        skipped = dyn(x)
        assert dyn.last_gates.sum() == 0
        torch.testing.assert_close(ceiling(x), skipped)
    with pytest.raises(ValueError, match="not a residual block"):
        block_gates.without_blocks(model, ["layer1.0.conv1"])


@pytest.mark.parametrize("granularity", ["region", "pixel"])
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_fixed_masks_realize_the_target_mac_weighted_density(granularity, density):
    dyn = dynify.convert(
        "cifar_resnet20", "spatial-masks", weights="random", options={"granularity": granularity}
    )
    masks = spatial.fixed_masks(dyn, density, seed=0)
    assert [m.shape[1:] for m in masks] == [tuple(w.units()) for w in dyn.wrappers]
    total = sum(w.branch_macs for w in dyn.wrappers)
    coarsest_tile = max(w.branch_macs / (w.units()[0] * w.units()[1]) for w in dyn.wrappers)
    assert abs(spatial.realized_density(dyn, masks) - density) <= coarsest_tile / total
    assert spatial.fixed_masks(dyn, density, seed=0)[0].equal(masks[0])  # seeded
