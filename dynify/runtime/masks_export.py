"""The ONNX face of spatial masks: region masks keep their sparse path under one `If` per block.

Kept out of `masks` so the eager runtime reads without the export machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynify.passes.rewrite import copy_graph_replacing

if TYPE_CHECKING:
    from dynify.runtime.masks import SpatialMaskModel
    from dynify.runtime.sparse_residual import SparseResidual


class _ExportResidual(nn.Module):
    """One wrapper's export face: `torch.cond(any active, sparse tiles, zeros)`."""

    def __init__(self, wrapper: SparseResidual, index: int):
        super().__init__()
        self.wrapper = wrapper
        self.tile_branch = wrapper.tile_branch
        self.index = index
        self.units: Tensor | None = None

    def forward(self, x: Tensor, thresholds: Tensor) -> Tensor:
        from dynify.runtime.cascade import cond as _cond

        w = self.wrapper
        active = torch.sigmoid(w.mask_unit(x)) > 1.0 - thresholds[self.index]
        self.units = active.flatten(1).sum(1)
        if w.granularity == "pixel":  # dense masked product, skipped when no pixel is active
            return _cond(
                active.any(),
                lambda x, active: w.dense_masked(x, active),
                lambda x, active: x.new_zeros((x.shape[0], w.out_channels, *x.shape[-2:])),
                (x, active),
            )
        n_h, n_w = active.shape[1:]
        h, width = x.shape[-2:]
        t, halo = w.tile, w.halo
        size = t + 2 * halo
        out_shape = (x.shape[0], w.out_channels, h, width)

        inside = w._inside((h, width), x.device).repeat(x.shape[0], 1, 1, 1)

        def sparse(x: Tensor, active: Tensor, inside: Tensor) -> Tensor:
            index = torch.nonzero(active.flatten()).squeeze(1)
            torch._check(index.shape[0] > 0)  # this branch runs only when a tile is active
            padded = F.pad(x, (halo, n_w * t - width + halo, halo, n_h * t - h + halo))
            tiles = padded.unfold(2, size, t).unfold(3, size, t)  # [B, C, nH, nW, s, s]
            tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], size, size)
            tiles = tiles.index_select(0, index)
            result = self.tile_branch(tiles, inside.index_select(0, index))
            canvas = result.new_zeros(x.shape[0] * n_h * n_w, w.out_channels, t, t)
            canvas = canvas.index_copy(0, index, result)
            out = canvas.view(x.shape[0], n_h, n_w, w.out_channels, t, t)
            out = out.permute(0, 3, 1, 4, 2, 5).reshape(
                x.shape[0], w.out_channels, n_h * t, n_w * t
            )
            return out[..., :h, :width].contiguous()

        def skip(x: Tensor, active: Tensor, inside: Tensor) -> Tensor:
            return x.new_zeros(out_shape)

        return _cond(active.any(), sparse, skip, (x, active, inside))


class SpatialMaskExport(nn.Module):
    """The whole masked network for export, thresholds as an input."""

    def __init__(self, dyn: SpatialMaskModel):
        super().__init__()
        replacements = {
            name: _ExportResidual(w, i)
            for i, (name, w) in enumerate(zip(dyn.wrapper_names, dyn.wrappers, strict=True))
        }
        self.net = copy_graph_replacing(
            dyn.net, replacements, extra_input="thresholds", class_name="SpatialMaskExportNet"
        )
        self.residuals = list(replacements.values())
        self.register_buffer("thresholds", dyn.thresholds.detach().clone())

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        thr = self.thresholds if thresholds is None else thresholds
        logits = self.net(x, thr.to(torch.float32))
        return logits, torch.stack([r.units for r in self.residuals], 1)

    output_names = ("logits", "active_units")


def export_spatial_onnx(
    dyn: SpatialMaskModel, example_input: Tensor, path: str, *, dynamic_batch: bool = True
) -> Any:
    """Export the masked network to ONNX (thresholds an input) and check it in ONNX Runtime.

    Region masks keep their sparse path (NonZero + Gather of the active tiles, Conv on them,
    ScatterND back) under one `If` per block; the eager model is the parity reference for the
    logits and the export face's active-unit counts for the decisions. Returns the
    `dynify.export.onnx.OnnxExport` record (path, If nodes, parity report).
    """
    from dynify.export.onnx import write_onnx

    return write_onnx(
        dyn.export_module().eval(), example_input, path, dynamic_batch=dynamic_batch, reference=dyn
    )
