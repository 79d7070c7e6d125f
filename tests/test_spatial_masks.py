"""Spatial masks: static equivalence, real sparsity, sparse == dense masked, accounting, training."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynify
from dynify.errors import StrategyError
from dynify.runtime.mask_geometry import fit_tile
from dynify.runtime.model import INPUT_NAMES, OUTPUT_NAMES
from dynify.runtime.sparse_residual import SparseResidual
from dynify.runtime.spatial_masks import SpatialMaskModel
from tests.conftest import randomize_bn

GRANULARITIES = ("region", "pixel")


class Basic(nn.Module):
    """conv-bn-relu-conv-bn + identity (ResNet basic block): halo 2."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class PreAct(nn.Module):
    """bn-relu-conv-bn-relu-conv: ops before the first conv, so the border must be re-zeroed."""

    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(y)))


class Bottleneck(nn.Module):
    """1x1 - dilated 3x3 - 1x1 with a projection shortcut: halo 2 from one conv."""

    def __init__(self, c: int, mid: int):
        super().__init__()
        self.a, self.bna = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.b, self.bnb = nn.Conv2d(mid, mid, 3, padding=2, dilation=2), nn.BatchNorm2d(mid)
        self.c = nn.Conv2d(mid, c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = torch.relu(self.bnb(self.b(torch.relu(self.bna(self.a(x))))))
        return torch.relu(self.proj(x) + self.c(y))


class Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.short = nn.Conv2d(c, 2 * c, 1, stride=2)

    def forward(self, x):
        return torch.relu(self.short(x) + self.conv(x))


class MaskNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Basic(8), PreAct(8), Bottleneck(8, 4), Down(8), Basic(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean((2, 3)))


INPUT = (3, 13, 13)  # 13 is prime: tiles of 4 leave partial tiles at the border


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    net = MaskNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.5)  # BN(0) != 0: border mistakes become visible
    return randomize_bn(net)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, *INPUT, generator=torch.Generator().manual_seed(1))


def convert(model, granularity="region", **options) -> SpatialMaskModel:
    opts = {"granularity": granularity, "tile": 4, **options}
    return dynify.convert(model, "spatial-masks", torch.zeros(1, *INPUT), options=opts).eval()


def random_masks(dyn: SpatialMaskModel, batch: int, density: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, *w.units(), generator=gen) < density for w in dyn.wrappers]


def block_inputs(dyn: SpatialMaskModel, x: torch.Tensor) -> list[torch.Tensor]:
    feats: list[torch.Tensor] = []
    hooks = [w.register_forward_pre_hook(lambda m, a: feats.append(a[0])) for w in dyn.wrappers]
    with torch.no_grad(), dyn.static():
        dyn(x)
    for h in hooks:
        h.remove()
    return feats


def randomize_mask_units(dyn: SpatialMaskModel) -> None:
    gen = torch.Generator().manual_seed(3)
    for w in dyn.wrappers:
        w.mask_unit.conv.weight.data = torch.randn(w.mask_unit.conv.weight.shape, generator=gen)
        w.mask_unit.conv.bias.data.zero_()


def test_plan_masks_stride1_blocks_and_says_why_it_skips_the_rest(model):
    dyn = convert(model)
    plan = dyn.spec["plan"]
    assert len(plan["blocks"]) == 4
    assert len(plan["skipped"]) == 1
    assert "spatial size" in plan["skipped"][0]["reason"]
    assert [w.halo for w in dyn.wrappers] == [2, 2, 2, 2]
    assert fit_tile(8, (56, 56)) == 8 and fit_tile(8, (28, 28)) == 7 and fit_tile(4, (13, 13)) == 4


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_density_one_equals_the_static_model(model, x, granularity):
    dyn = convert(model, granularity)
    randomize_mask_units(dyn)
    dyn.set_thresholds(1.01)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(dyn(x), expected)  # every unit active: the dense branch runs
        assert torch.equal(dyn.densities(), torch.ones(3, 4))
        for w in dyn.wrappers:
            w.dense_when_full = False  # force the sparse path at full density
        assert (dyn(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_density_zero_runs_no_branch(model, x, granularity):
    dyn = convert(model, granularity)
    randomize_mask_units(dyn)
    dyn.set_thresholds(0.0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dyn(x)
    masked = sum(w.branch_macs for w in dyn.wrappers)
    mask_units = sum(w.mask_macs for w in dyn.wrappers)
    assert counter.get_total_flops() // 2 == 3 * (dyn.static_macs - masked + mask_units)
    assert torch.equal(dyn.last_macs, torch.full((3,), dyn.static_macs - masked + mask_units))
    assert dyn.densities().sum() == 0


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_sparse_execution_equals_dense_masked_computation(model, x, granularity, density):
    dyn = convert(model, granularity)
    feats = block_inputs(dyn, x)
    masks = random_masks(dyn, 3, density, seed=int(density * 10))
    with torch.no_grad():
        for w, feat, mask in zip(dyn.wrappers, feats, masks, strict=True):
            w.fixed_mask = mask
            w.dense_when_full = False
            sparse = w(feat)
            reference = w.dense_masked(feat, mask)
            assert (sparse - reference).abs().max() <= 1e-5
            assert torch.allclose(w.last_density, mask.flatten(1).float().mean(1))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_mac_accounting_is_what_runs(model, x, granularity):
    """last_macs equals the MACs FlopCounter sees, and falls with the mask density."""
    dyn = convert(model, granularity)
    spent = []
    for density in (0.25, 0.5, 0.75):
        dyn.set_fixed_masks(random_masks(dyn, 3, density, seed=5))
        for w in dyn.wrappers:
            w.dense_when_full = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            dyn(x)
        assert counter.get_total_flops() // 2 == int(dyn.last_macs.sum())
        spent.append(int(dyn.last_macs.sum()))
    assert spent[0] < spent[1] < spent[2]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_fully_active_sample_costs_the_same_in_a_mixed_batch(model, x, granularity):
    """A sample whose every unit is active runs the dense branch (`dense_when_full`) in a
    mixed batch as it does alone: the same output and the same last_macs, which FlopCounterMode
    confirms."""
    dyn = convert(model, granularity)
    masks = random_masks(dyn, 3, 0.5, seed=7)
    for mask in masks:
        mask[0] = True  # sample 0 fully active in every block; samples 1, 2 partly
    with torch.no_grad():
        dyn.set_fixed_masks(masks)
        with FlopCounterMode(display=False) as counter:
            batch = dyn(x)
        assert counter.get_total_flops() // 2 == int(dyn.last_macs.sum())
        batch_macs = dyn.last_macs.clone()
        assert batch_macs[0] == dyn.static_macs  # the dense branch, not halo'd tiles
        for i in range(3):
            dyn.set_fixed_masks([m[i : i + 1] for m in masks])
            assert (dyn(x[i : i + 1]) - batch[i : i + 1]).abs().max() <= 1e-5
            assert dyn.last_macs[0] == batch_macs[i]


def test_per_sample_masks_give_per_sample_results(model, x):
    """A batch gives each sample exactly what it gets alone (masks differ per sample)."""
    dyn = convert(model)
    randomize_mask_units(dyn)
    for w in dyn.wrappers:
        w.dense_when_full = (
            False  # else a fully active sample alone runs (and costs) the dense branch
        )
    with torch.no_grad():
        batch = dyn(x)
        macs = dyn.last_macs.clone()
        for i in range(3):
            assert (dyn(x[i : i + 1]) - batch[i : i + 1]).abs().max() <= 1e-5
            assert dyn.last_macs[0] == macs[i]


def test_larger_threshold_never_computes_less(model, x):
    dyn = convert(model, "pixel")
    randomize_mask_units(dyn)
    spent = []
    with torch.no_grad():
        for t in (0.0, 0.2, 0.5, 0.8, 1.01):
            dyn.set_thresholds(t)
            dyn(x)
            spent.append(dyn.last_macs)
    for a, b in itertools.pairwise(spent):
        assert bool((a <= b).all())
    assert int(spent[-1].min()) >= dyn.static_macs


def test_gumbel_training_steers_density_to_the_budget(model, x):
    dyn = convert(model, budget=0.2, sparsity_weight=20.0)
    with torch.no_grad():
        teacher = model(x)
    dyn.train()
    assert not dyn.wrappers[0].branch.training  # backbone batch norm stays frozen
    optimizer = torch.optim.Adam(dyn.mask_parameters(), lr=0.1)
    torch.manual_seed(0)
    first = None
    for _ in range(40):
        loss, stats = dyn.training_loss(x, teacher)
        first = stats["density"] if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert {"kd", "density", "sparsity", "loss"} <= set(stats)
    assert first > 0.8 and stats["density"] < 0.45
    assert all(p.grad is not None for p in dyn.mask_parameters())
    dyn.eval()
    with torch.no_grad():
        dyn(x)
    assert float(dyn.densities().mean()) < 0.6  # the deterministic masks follow the training


def test_budget_as_a_mac_fraction_maps_to_a_density(model):
    dyn = convert(model)
    assert dyn.budget_density(None) == 0.5
    assert dyn.budget_density(1.0) == 1.0
    fixed = dyn.fixed_macs / dyn.static_macs
    assert dyn.budget_density(fixed) == 0.0
    assert 0.0 < dyn.budget_density((1 + fixed) / 2) < 1.0


def test_options_are_checked(model):
    with pytest.raises(StrategyError, match="granularity"):
        convert(model, "voxel")
    with pytest.raises(StrategyError, match="Unknown spatial-masks option"):
        convert(model, tiles=3)
    with pytest.raises(StrategyError, match="not residual joins"):
        convert(model, blocks=["nope"])
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    plain(torch.zeros(1, *INPUT))
    with pytest.raises(StrategyError, match="No residual block"):
        dynify.convert(plain.eval(), "spatial-masks", torch.zeros(1, *INPUT))


def test_wrapper_is_a_sparse_residual(model):
    dyn = convert(model)
    assert all(isinstance(w, SparseResidual) for w in dyn.wrappers)
    names = set(dict(dyn.named_modules()))
    assert "net.spatial_mask_0.branch" in {n for n in names if n.endswith("branch")}
    # no second copy of the branch weights in the state dict
    assert not any("tile_branch" in k for k in dyn.state_dict())


@pytest.mark.slow
def test_region_masks_export_to_onnx_with_parity(model, x, tmp_path):
    from dynify.export.onnx import write_onnx
    from dynify.export.verify import count_executed_ops

    dyn = convert(model)
    randomize_mask_units(dyn)
    path = tmp_path / "m.onnx"
    result = write_onnx(dyn.export_face().eval(), x[:2], path, reference=dyn)
    assert result.report.ok and result.report.max_abs_diff <= 1e-4
    assert result.if_nodes >= dyn.num_masks
    assert (result.input_names, result.output_names) == (INPUT_NAMES, OUTPUT_NAMES)
    none = count_executed_ops(path, x[:1], [0.0] * 4)
    full = count_executed_ops(path, x[:1], [1.01] * 4)
    branch_convs = sum(len(w._convs) for w in dyn.wrappers)  # 2 + 2 + 3 + 2
    assert full - none == branch_convs  # branch convs run only when a tile is active


@pytest.mark.slow
def test_pixel_masks_export_the_dense_masked_product(model, x, tmp_path):
    from dynify.export.onnx import write_onnx

    dyn = convert(model, "pixel")
    randomize_mask_units(dyn)
    result = write_onnx(dyn.export_face().eval(), x[:2], tmp_path / "p.onnx", reference=dyn)
    assert result.report.ok and result.if_nodes >= dyn.num_masks
