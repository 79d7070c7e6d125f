"""Does a spatial mask's MAC saving become a time saving? Masked blocks timed at forced densities.

For each density, every masked block gets a fixed mask of that MAC-weighted density
(`force_mask_density`). Each block's dense branch and its sparse wrapper are then timed
interleaved, call by call, on the block input the static network gives it, and the medians
are summed over the blocks; the whole network (static against forced masks) is timed the same
way. Both wall and this thread's CPU time are recorded: on a shared machine the CPU time is the
steadier of the two. A learned mask's own cost (its mask unit) is not part of these figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from dynify.errors import InputError
from dynify.runtime.forced_masks import as_mask_model, force_mask_density
from dynify.runtime.model import DynamicModel
from dynify.runtime.spatial_masks import SpatialMaskModel

DENSITIES = (1.0, 0.5, 0.25, 0.1)


@dataclass
class MaskedBlockRow:
    """One forced density: the masked blocks dense and sparse, and the whole network."""

    density: float  # the target MAC-weighted density
    dense_fallback: bool  # a block whose every unit is active runs its dense branch
    realized_density: float  # the MAC-weighted density the masks realise
    macs_fraction: float  # MACs the wrappers spent / the masked blocks' dense MACs
    blocks_dense_ms: float  # sums over the masked blocks of per-call medians, wall
    blocks_sparse_ms: float
    blocks_dense_cpu_ms: float  # the same in this thread's CPU time
    blocks_sparse_cpu_ms: float
    partial_blocks: int  # blocks whose mask is neither all on nor all off
    partial_density: float  # their MAC-weighted density
    partial_cpu_speedup: float  # their dense / sparse CPU time (nan without any)
    net_dense_ms: float  # the whole network, static mode / forced masks, medians
    net_dynamic_ms: float
    net_dense_cpu_ms: float
    net_dynamic_cpu_ms: float
    max_abs_err_vs_dense_masked: float  # sparse path against the dense branch, masked

    @property
    def speedup(self) -> float:
        return self.blocks_dense_ms / self.blocks_sparse_ms

    @property
    def cpu_speedup(self) -> float:
        return self.blocks_dense_cpu_ms / self.blocks_sparse_cpu_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup, "cpu_speedup": self.cpu_speedup}


@dataclass
class MaskedBlockBench:
    """The masked blocks of one spatial-masks model timed at each forced density."""

    granularity: str
    tiles: list[int]  # each masked block's tile side (1: pixels)
    masked_blocks: int
    masked_share_of_macs: float  # the masked blocks' dense MACs / the static network's
    skipped_blocks: list[str]  # residual joins the plan could not mask
    runs: int
    threads: int
    rows: list[MaskedBlockRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [r.to_dict() for r in self.rows]}


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], runs: int) -> list[float]:
    """Medians of (a wall, b wall, a CPU, b CPU) over `runs` alternating calls, one untimed
    call of each first."""
    a(), b()
    times: list[list[float]] = [[], [], [], []]
    for _ in range(runs):
        wall, cpu = _timed(a)
        times[0].append(wall)
        times[2].append(cpu)
        wall, cpu = _timed(b)
        times[1].append(wall)
        times[3].append(cpu)
    return [statistics.median(t) for t in times]


def _block_inputs(model: SpatialMaskModel, x: Tensor) -> list[Tensor]:
    """What each masked block receives in the static network for input `x`."""
    feats: list[Tensor] = [torch.empty(0)] * model.num_masks
    hooks = [
        w.register_forward_pre_hook(lambda m, a: feats.__setitem__(m.index, a[0]))
        for w in model.wrappers
    ]
    try:
        with model.static():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return feats


def _row(
    model: SpatialMaskModel,
    x: Tensor,
    feats: list[Tensor],
    density: float,
    dense_fallback: bool,
    runs: int,
    seed: int,
) -> MaskedBlockRow:
    wrappers = model.wrappers
    for w in wrappers:
        w.dense_when_full = dense_fallback
    realized = force_mask_density(model, density, seed=seed)
    assert realized is not None
    blocks = [0.0, 0.0, 0.0, 0.0]  # dense wall, sparse wall, dense CPU, sparse CPU
    partial = {"dense_cpu": 0.0, "sparse_cpu": 0.0, "macs": 0, "active_macs": 0.0, "count": 0}
    err, spent = 0.0, 0
    for w, feat in zip(wrappers, feats, strict=True):
        medians = _interleaved(lambda w=w, f=feat: w.branch(f), lambda w=w, f=feat: w(f), runs)
        blocks = [total + m for total, m in zip(blocks, medians, strict=True)]
        mask = w.fixed_mask
        assert mask is not None
        if 0 < int(mask.sum()) < mask.numel():
            partial["count"] += 1
            partial["dense_cpu"] += medians[2]
            partial["sparse_cpu"] += medians[3]
            partial["macs"] += w.branch_macs
            partial["active_macs"] += float(mask.float().mean()) * w.branch_macs
        out = w(feat)
        # what the eager forward spent on the branch (a forced mask: no mask-unit MACs)
        active = mask.reshape(1, *mask.shape[-2:]).expand(feat.shape[0], -1, -1)
        spent += int(w.planned_macs(active).sum())
        err = max(err, float((out - w.dense_masked(feat, mask)).abs().max()))

    def static() -> Tensor:
        with model.static():
            return model(x)

    net = _interleaved(static, lambda: model(x), max(3, runs // 3))
    return MaskedBlockRow(
        density=density,
        dense_fallback=dense_fallback,
        realized_density=realized,
        macs_fraction=spent / sum(w.branch_macs for w in wrappers),
        blocks_dense_ms=1e3 * blocks[0],
        blocks_sparse_ms=1e3 * blocks[1],
        blocks_dense_cpu_ms=1e3 * blocks[2],
        blocks_sparse_cpu_ms=1e3 * blocks[3],
        partial_blocks=int(partial["count"]),
        partial_density=partial["active_macs"] / max(partial["macs"], 1),
        partial_cpu_speedup=partial["dense_cpu"] / partial["sparse_cpu"]
        if partial["sparse_cpu"]
        else float("nan"),
        net_dense_ms=1e3 * net[0],
        net_dynamic_ms=1e3 * net[1],
        net_dense_cpu_ms=1e3 * net[2],
        net_dynamic_cpu_ms=1e3 * net[3],
        max_abs_err_vs_dense_masked=err,
    )


@torch.no_grad()
def bench_masked_blocks(
    dyn: DynamicModel,
    densities: Sequence[float] = DENSITIES,
    *,
    dense_fallback_row: bool = True,
    runs: int = 15,
    seed: int = 0,
    threads: int | None = None,
) -> MaskedBlockBench:
    """Batch-1 latency of a spatial-masks model's masked blocks at each forced density, sparse
    against dense (see the module's docstring), on a seeded random input.

    The density rows run the sparse path whatever the mask (`dense_fallback` False: a block
    with every unit active still gathers its tiles); with `dense_fallback_row`, a last row at
    density 1 lets such blocks run their dense branch, as inference does. `threads` (default:
    torch.get_num_threads()) sets PyTorch's intra-op threads for the timing. The model's
    masks, thresholds and fallback setting are restored afterwards.
    """
    model = as_mask_model(dyn)
    if runs < 1:
        raise InputError(f"runs must be at least 1, got {runs}.")
    threads = int(threads or torch.get_num_threads())
    cases = [(float(d), False) for d in densities]
    if dense_fallback_row:
        cases.append((1.0, True))
    wrappers = model.wrappers
    saved_fallback = [w.dense_when_full for w in wrappers]
    saved_masks = [w.fixed_mask for w in wrappers]
    saved_threads = torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads)
    try:
        x = model.random_input(1, torch.Generator().manual_seed(seed))
        feats = _block_inputs(model, x)
        rows = [_row(model, x, feats, d, fallback, runs, seed) for d, fallback in cases]
    finally:
        torch.set_num_threads(saved_threads)
        model.set_fixed_masks(saved_masks)
        for w, fallback in zip(wrappers, saved_fallback, strict=True):
            w.dense_when_full = fallback
    block_macs = sum(w.branch_macs for w in wrappers)
    return MaskedBlockBench(
        granularity=model.granularity,
        tiles=[w.tile for w in wrappers],
        masked_blocks=len(wrappers),
        masked_share_of_macs=block_macs / model.static_macs,
        skipped_blocks=[s["join"] for s in model.spec.get("plan", {}).get("skipped", [])],
        runs=runs,
        threads=threads,
        rows=rows,
    )
