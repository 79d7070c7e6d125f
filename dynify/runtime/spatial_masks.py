"""Spatial masks over residual branches (DynConv, SACT): the model, its training loss, its
export face.

Position active iff sigmoid(score) > 1 - threshold (`decisions.gate_open`): threshold 0 computes
no branch at all and a threshold above 1 computes every position. The wrapper lives in
`sparse_residual.py`, the mask unit in `units.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
from torch import Tensor, nn

from dynify.runtime.decisions import gate_probability
from dynify.runtime.gate_wrapper import RunContext
from dynify.runtime.mac_cap import CapHolder
from dynify.runtime.model import DECIDER, FIXED, UNIT, CostBook, DynamicModel, ExportFace
from dynify.runtime.sparse_residual import (
    MaskExportRun,
    MaskPass,
    SparseResidual,
    branch_item,
    mask_item,
)
from dynify.train.losses import LossConfig, density_term, distillation

REST = "rest"  # the cost book's item of the unmasked layers


def cost_book(static_macs: int, wrappers: Sequence[SparseResidual]) -> CostBook:
    """Per masked block, its mask unit (every sample runs it) and its branch, at most its
    dearest (`SparseResidual.dearest_branch_macs`); the rest is every sample's."""
    book = CostBook(static_macs)
    for i, w in enumerate(wrappers):
        book.add(mask_item(i), w.mask_macs, DECIDER)
        book.add(branch_item(i), w.branch_macs, UNIT, dearest=w.dearest_branch_macs())
    book.add(REST, static_macs - sum(w.branch_macs for w in wrappers), FIXED)
    return book


class SpatialMaskModel(CapHolder, DynamicModel):
    """A network whose residual branches are wrapped in `SparseResidual`s.

    `net` is the rewritten graph: each masked block's branch is one call to a wrapper named
    `spatial_mask_<i>`. Per-sample MACs are the unmasked part of the network plus what every
    wrapper really computed (its mask unit and the tiles/positions it ran).

    With a MAC cap (`set_mac_cap`, `dynify.runtime.mac_cap`) a block's active units run only
    if they fit what is left of the sample's allowance; otherwise only its first units in
    raster order that surely fit. `static()` ignores the cap.
    """

    strategy = "spatial-masks"
    optional_state = ("mac_cap",)

    def __init__(
        self,
        net: torch.fx.GraphModule,
        wrapper_names: Sequence[str],
        *,
        block_names: Sequence[str],
        granularity: str,
        budget: float,
        thresholds: Sequence[float],
        static_macs: int,
        book: CostBook,
        input_shape: tuple[int, ...],
        num_classes: int,
        distill_temperature: float = 4.0,
        sparsity_weight: float = 10.0,
    ):
        super().__init__(
            static_macs=static_macs,
            input_shape=input_shape,
            num_classes=num_classes,
            thresholds=thresholds,
            book=book,
        )
        self.net = net
        self.wrapper_names = list(wrapper_names)
        self.block_names = list(block_names)
        self.granularity = granularity
        self.budget = float(budget)
        self.distill_temperature = float(distill_temperature)
        self.sparsity_weight = float(sparsity_weight)
        self._context = RunContext()
        self._shared = MaskPass()
        for i, wrapper in enumerate(self.wrappers):
            wrapper.index, wrapper.context, wrapper.shared = i, self._context, self._shared
        self.init_mac_cap()

    @property
    def fixed_macs(self) -> int:
        """The layers no mask touches."""
        return self.book.fixed_macs()

    def cap_floor(self) -> int:
        """What a sample spends whatever it decides (no unit active, every mask unit run):
        the least MAC cap there can be (`dynify.runtime.mac_cap`)."""
        return self.book.floor()

    @property
    def wrappers(self) -> list[SparseResidual]:
        return [self.net.get_submodule(name) for name in self.wrapper_names]

    @property
    def num_masks(self) -> int:
        return len(self.wrapper_names)

    def train(self, mode: bool = True) -> SpatialMaskModel:
        """Only the mask units change mode: the backbone's batch norm keeps its statistics."""
        super().train(False)
        for wrapper in self.wrappers:
            wrapper.mask_unit.train(mode)
        self.training = mode
        return self

    def describe(self) -> list[dict[str, str]]:
        """One row per masked block for tables: where, how fine, what it costs, its threshold."""
        rows = []
        for name, w, t in zip(self.block_names, self.wrappers, self.thresholds, strict=True):
            h, width = w.units()
            unit = f"{w.tile}x{w.tile} tiles" if w.granularity == "region" else "pixels"
            rows.append(
                {
                    "block": name,
                    "units": f"{h}x{width} {unit}",
                    "halo": str(w.halo),
                    **self.book.columns(w.branch_macs, "branch MACs"),
                    "threshold": f"{float(t):.3f}",
                }
            )
        return rows

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for w in self.wrappers for p in w.mask_unit.parameters()]

    def set_fixed_masks(self, masks: Sequence[Tensor | None] | None) -> None:
        """Force each wrapper's mask ([B, h, w] bool), or None to use the mask units again."""
        masks = [None] * self.num_masks if masks is None else list(masks)
        for wrapper, mask in zip(self.wrappers, masks, strict=True):
            wrapper.fixed_mask = mask

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        for i, wrapper in enumerate(self.wrappers):
            wrapper.static = self._static
            wrapper.threshold = self.thresholds[i]
        shared = self._shared
        if not self._static:
            shared.tab = self.open_tab(x.shape[0])
            if not self.training:
                shared.left = self.allowance(self.cap_macs(), x)
        tab = shared.tab
        try:
            out = self.net(x)
        finally:  # a wrapper called on its own afterwards is dynamic again, and charges no tab
            shared.tab = shared.left = None
            for wrapper in self.wrappers:
                wrapper.static = False
        if tab is None:
            self.record_static(x.shape[0])
        else:
            self.close_tab(tab)
        return out

    def unit_probabilities(self, x: Tensor) -> list[Tensor]:
        """Differentiable in `x`: per masked block, the probability [B, h, w] each unit is
        active, on the static network's features; what a slowdown attack pushes over
        1 - threshold."""
        inputs = self.static_inputs_of(self.wrappers, x)
        return [
            gate_probability(w.mask_unit(entry))
            for w, entry in zip(self.wrappers, inputs, strict=True)
        ]

    def last_decisions(self) -> Tensor:
        """[N, num_masks] int64: the units each masked block computed for each sample."""
        units = torch.tensor([h * w for h, w in (wr.units() for wr in self.wrappers)])
        return (self.densities() * units).round().long()

    def densities(self) -> Tensor:
        """[B, num_masks]: fraction of units each block computed in the last forward."""
        return torch.stack([w.last_density.cpu() for w in self.wrappers], 1)

    def budget_density(self, budget: float | None) -> float:
        """The mean branch density that spends `budget` (a fraction of static MACs)."""
        if budget is None:
            return self.budget
        masked = self.static_macs - self.fixed_macs
        return min(1.0, max(0.0, (budget * self.static_macs - self.fixed_macs) / max(masked, 1)))

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation (+ labels) + sparsity_weight * (MAC-weighted density - target)^2.

        Masks are sampled with Gumbel straight-through noise (the mask units must be in train
        mode: `train()` or the fine-tuning loop). `budget` is a fraction of the static MACs,
        turned into the branch density that spends it; without it the strategy's `budget`
        option is the target density. Without `teacher_logits` the static network teaches.
        """
        self.check_input(x)
        config = config or LossConfig()
        if teacher_logits is None:
            with torch.no_grad(), self.static():
                teacher_logits = self(x)
        for wrapper in self.wrappers:
            wrapper.train_density = None
        logits = self(x)
        t = config.temperature(self.distill_temperature)
        loss, stats = distillation(logits, teacher_logits, labels, t, config.label_weight)
        densities = [w.train_density for w in self.wrappers]
        if any(d is None for d in densities):
            raise RuntimeError("training_loss needs the mask units in train mode (call train()).")
        weights = torch.tensor([w.branch_macs for w in self.wrappers], dtype=torch.float32)
        mean_density = (torch.stack(densities) * weights).sum() / weights.sum()
        sparsity = density_term(mean_density, self.budget_density(config.budget), 1.0)
        loss = loss + self.sparsity_weight * sparsity
        stats.update(
            density=float(mean_density.detach()),
            sparsity=float(sparsity.detach()),
            loss=float(loss.detach()),
        )
        return loss, stats

    def export_face(self) -> SpatialMaskExport:
        """The export face: forward(x, thresholds) -> (logits, active units [B, num_masks]).

        Region masks export their real sparse path (NonZero, Gather, Conv on the gathered
        tiles, ScatterND) under one `If` per block that skips the branch when no tile is
        active; pixel masks export the dense masked product (see docs/spatial.md).
        """
        return SpatialMaskExport(self)


class SpatialMaskExport(ExportFace):
    """The masked network for export, thresholds as an input: each wrapper runs its export
    face (`SparseResidual.export_forward`); the decisions are the units each block computed
    per sample, int64 [N, num_masks]."""

    def __init__(self, model: SpatialMaskModel):
        super().__init__(model.thresholds)
        self.model = model
        # the MAC cap as it is now: a Python int, so the export keeps it as a constant
        self.cap = model.cap_macs()

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        model = self.model
        run = MaskExportRun(self.thresholds_or_default(thresholds), model.allowance(self.cap, x))
        model._context.run = run
        try:
            logits = model.net(x)
        finally:
            model._context.run = None
        return logits, torch.stack([run.units[i] for i in range(model.num_masks)], 1)
