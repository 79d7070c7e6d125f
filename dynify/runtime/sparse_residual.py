"""The gather-run-scatter wrapper that computes a residual branch only at its active units.

How the region (valid convs on halo'd tiles) and pixel (im2col of the needed positions) paths
equal `branch(x) * mask`: docs/spatial.md, "Real sparsity, the same function".
"""

from __future__ import annotations

import math
import threading

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynify.frontend.cost import MACS, module_macs
from dynify.passes.rewrite import copy_graph_replacing
from dynify.runtime import mac_cap
from dynify.runtime.control import cond
from dynify.runtime.decisions import gate_open, gate_probability, straight_through_gumbel
from dynify.runtime.gate_wrapper import RunContext
from dynify.runtime.ledger import Tab
from dynify.runtime.mask_geometry import (
    GRANULARITIES,
    branch_halo,
    conv_radius,
    expand_mask,
    fit_tile,
    tile_branch,
)
from dynify.runtime.units import MaskUnit


class MaskExportRun:
    """One forward of the export face: the thresholds in, each block's active-unit counts out.

    The model's wrappers share it through their `RunContext`: binding a run changes no module
    attribute, which torch.export refuses during tracing.
    """

    __slots__ = ("left", "thresholds", "units")

    def __init__(self, thresholds: Tensor, left: Tensor | None = None):
        self.thresholds = thresholds
        self.units: dict[int, Tensor] = {}
        self.left = left  # the MAC cap's allowance left per sample, or None


class MaskPass(threading.local):
    """An eager forward in progress, shared by a model's wrappers, per thread: the tab they
    charge (`dynify.runtime.ledger`; None: a wrapper run on its own) and the MAC cap's
    allowance left per sample ([B] float64, `dynify.runtime.mac_cap`; None: no cap)."""

    tab: Tab | None = None
    left: Tensor | None = None

    def __reduce__(self) -> tuple:
        return (type(self), ())


def mask_item(index: int) -> str:
    """The cost book's item of masked block `index`'s mask unit."""
    return f"mask{index}"


def branch_item(index: int) -> str:
    """The cost book's item of masked block `index`'s branch (its active units' share)."""
    return f"branch{index}"


class _CallState(threading.local):
    """A wrapper's per-forward state, per thread: the mode and threshold its model set for the
    forward in progress and what that forward recorded. Two threads running one model at once
    (one of them inside `static()`) each read and write their own. A copy starts afresh."""

    static = False
    threshold: Tensor | float = 0.5
    last_density: Tensor | None = None
    train_density: Tensor | None = None

    def __reduce__(self) -> tuple:
        return (type(self), ())


def _per_thread(name: str) -> property:
    """An attribute of the wrapper kept in its per-thread `_CallState`."""

    def get(self: SparseResidual):
        return getattr(self._calls, name)

    def set_(self: SparseResidual, value) -> None:
        setattr(self._calls, name, value)

    return property(get, set_, doc=f"`{name}` of this thread's forward (see `_CallState`).")


class SparseResidual(nn.Module):
    """A residual branch computed only where its mask unit says so.

    Modes: static (the dense branch, the original network), training (dense branch times a
    Gumbel straight-through mask), and eager inference (the sparse gather-run-scatter). The
    DynamicModel sets `threshold` and `static` before each forward; they and the records
    (`last_density`, `train_density`) are per thread. An eager forward charges the model's
    tab (`shared.tab`) with its mask unit (`mask_item`) and what its branch computed
    (`branch_item`). `fixed_mask` ([B, h, w]
    bool), when set, replaces the mask unit's decision for every thread (benchmarks, tests).
    """

    static = _per_thread("static")
    threshold = _per_thread("threshold")
    last_density = _per_thread("last_density")  # [B], fraction of units computed
    train_density = _per_thread("train_density")  # differentiable mean density (training)

    def __init__(
        self,
        branch: torch.fx.GraphModule,
        *,
        in_channels: int,
        out_channels: int,
        granularity: str,
        tile: int,
        branch_macs: int,
        spatial: tuple[int, int],
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}")
        self.branch = branch
        self.tile = fit_tile(tile, spatial) if granularity == "region" else 1
        self.mask_unit = MaskUnit(in_channels, granularity, self.tile)
        self.granularity = granularity
        self.halo = branch_halo(branch)
        self.out_channels = out_channels
        self.branch_macs = int(branch_macs)
        self.spatial = spatial
        self._calls = _CallState()
        self.fixed_mask: Tensor | None = None
        self.index = 0  # this block's threshold entry and cost items (set by the model)
        self.context = RunContext()  # the model shares one among its wrappers (export face)
        self.shared = MaskPass()  # the model shares one among its wrappers (tab, MAC cap)
        self.dense_when_full = True
        # The branch's conv calls in order (it is a chain), each with its MACs per output
        # position: what the front end counted for the whole map over its positions.
        self._convs = [
            (node.target, branch.get_submodule(node.target), _position_macs(node))
            for node in branch.graph.nodes
            if node.op == "call_module" and isinstance(branch.get_submodule(node.target), nn.Conv2d)
        ]
        self._inside_cache: dict[tuple, Tensor] = {}
        # Not registered: they re-use the branch's modules (no second copy in the state dict).
        object.__setattr__(self, "tile_branch", tile_branch(branch))
        # counted by FlopCounterMode, as the front end counts the branch
        self.mask_macs = module_macs(self.mask_unit, torch.zeros(1, in_channels, *spatial))
        self._pixel_slot = _PixelSlot()
        object.__setattr__(self, "pixel_branch", self._pixel_branch())

    # -- the branch's convs ------------------------------------------------------------------

    def _pixel_branch(self) -> torch.fx.GraphModule:
        """The branch with every conv a PixelConv of this wrapper's pixel runs."""
        convs = {
            target: PixelConv(conv, macs, self._pixel_slot) for target, conv, macs in self._convs
        }
        return copy_graph_replacing(self.branch, convs, class_name="PixelBranch")

    def tile_macs(self) -> int:
        """MACs of the branch on one halo'd tile (valid convs shrink it layer by layer)."""
        size, total = self.tile + 2 * self.halo, 0
        for _, conv, macs in self._convs:
            size -= 2 * conv_radius(conv)
            total += macs * size * size
        return total

    def dearest_branch_macs(self) -> int:
        """The most one sample's branch can cost here (the cost book's dearest): the dense
        branch (all units active: it runs dense) or, for region masks, every tile but one,
        whose halos overlap and can cost more than the dense branch. Pixel masks compute each
        position at most once, at most the dense branch."""
        h, w = self.units()
        tiles = h * w - 1 if self.dense_when_full else h * w
        partial = tiles * self.tile_macs() if self.granularity == "region" else 0
        return max(self.branch_macs, partial)

    def worst_case_macs(self) -> int:
        """The most one sample can spend here: its mask unit and its dearest branch."""
        return self.mask_macs + self.dearest_branch_macs()

    def planned_macs(self, active: Tensor) -> Tensor:
        """[B] int64: the MACs the eager forward spends on the branch for the units `active`
        [B, h, w] (the mask unit not included): dense when every unit is active, else the
        active tiles (region) or every conv at the positions its output needs (pixel)."""
        counts = active.flatten(1).sum(1)
        if self.granularity == "region":
            partial = counts * self.tile_macs()
        else:
            m = active.to(torch.float32)[:, None]
            partial = torch.zeros_like(counts)
            remaining = self.halo
            for _, conv, macs in self._convs:
                remaining -= conv_radius(conv)
                near = m if remaining == 0 else F.max_pool2d(m, 2 * remaining + 1, 1, remaining)
                partial = partial + (near > 0).flatten(1).sum(1) * macs
        if not self.dense_when_full:
            return partial
        full = torch.full_like(partial, self.branch_macs)
        return torch.where(counts == active[0].numel(), full, partial)

    def unit_bound(self) -> int:
        """The most one more active unit can add to `planned_macs`: a halo'd tile (region),
        or every conv at every position within its reach (pixel); never below the dense
        branch's share per unit (all units active run it)."""
        h, w = self.units()
        if self.granularity == "region":
            bound = self.tile_macs()
        else:
            bound, remaining = 0, self.halo
            for _, conv, macs in self._convs:
                remaining -= conv_radius(conv)
                bound += macs * min((2 * remaining + 1) ** 2, h * w)
        return max(bound, math.ceil(self.branch_macs / (h * w)))

    def capped(self, active: Tensor, left: Tensor) -> tuple[Tensor, Tensor]:
        """The units the MAC cap lets run, and the allowance left after them: all of `active`
        where they fit, else its first k units in raster order, k the most sure to fit."""
        fit = mac_cap.fits(left, self.planned_macs(active))
        first = mac_cap.keep_first(active, mac_cap.units_that_fit(left, self.unit_bound()))
        fit = fit[:, None, None]
        active = (active & fit) | (first & ~fit)  # not `where`: ONNX Runtime has none for bool
        return active, left - self.planned_macs(active).to(torch.float64)

    def units(self) -> tuple[int, int]:
        h, w = self.spatial
        return math.ceil(h / self.tile), math.ceil(w / self.tile)

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, x: Tensor) -> Tensor:
        """Bool [B, h, w]: which units to compute (`fixed_mask` overrides the mask unit; a
        [1, h, w] one holds for every sample)."""
        if self.fixed_mask is not None:
            mask = self.fixed_mask.to(torch.bool)
            return mask.expand(x.shape[0], -1, -1) if mask.shape[0] == 1 else mask
        return gate_open(gate_probability(self.mask_unit(x)), self.threshold)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        export = self.context.run
        if export is not None:
            out, export.units[self.index], export.left = self.export_forward(
                x, export.thresholds[self.index], export.left
            )
            return out
        batch = x.shape[0]
        tab = self.shared.tab
        if self.static:
            self.last_density = torch.ones(batch)
            if tab is not None:
                tab.charge(branch_item(self.index))
            return self.branch(x)
        if self.mask_unit.training:
            return self._forward_train(x)
        active = self.decide(x)
        if self.shared.left is not None:
            active, self.shared.left = self.capped(active, self.shared.left)
        counts = active.flatten(1).sum(1)
        self.last_density = counts.float() / active[0].numel()
        if tab is not None and self.fixed_mask is None:  # a forced mask costs no mask unit
            tab.charge(mask_item(self.index))
        full = counts == active[0].numel()
        if self.dense_when_full and bool(full.any()):
            if bool(full.all()):
                if tab is not None:
                    tab.charge(branch_item(self.index))
                return self.branch(x)
            out, macs = self._dense_and_sparse(x, active, counts, full)
        else:
            out, macs = self._sparse(x, active, counts)
        if tab is not None:
            tab.charge_amount(branch_item(self.index), macs)
        return out

    def _sparse(self, x: Tensor, active: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """The branch at the active units only: (output, MACs per sample)."""
        if self.granularity == "region":
            return self.tile_forward(x, active), counts * self.tile_macs()
        return self.pixel_forward(x, active)

    def _dense_and_sparse(
        self, x: Tensor, active: Tensor, counts: Tensor, full: Tensor
    ) -> tuple[Tensor, Tensor]:
        """A mixed batch: the fully active samples run the dense branch, as each would alone
        (cheaper than all its halo'd tiles), the others their active units."""
        dense, sparse = full.nonzero().squeeze(1), (~full).nonzero().squeeze(1)
        part, part_macs = self._sparse(
            x.index_select(0, sparse),
            active.index_select(0, sparse),
            counts.index_select(0, sparse),
        )
        out = part.new_zeros(x.shape[0], *part.shape[1:])
        out.index_copy_(0, sparse, part)
        out.index_copy_(0, dense, self.branch(x.index_select(0, dense)).to(out.dtype))
        macs = torch.full((x.shape[0],), self.branch_macs, dtype=torch.long, device=x.device)
        return out, macs.index_copy(0, sparse, part_macs.to(torch.long))

    def _forward_train(self, x: Tensor) -> Tensor:
        """Dense branch times a Gumbel straight-through mask: differentiable in the mask unit."""
        mask = straight_through_gumbel(self.mask_unit(x))
        self.train_density = mask.mean()
        self.last_density = mask.detach().flatten(1).mean(1)
        tab = self.shared.tab
        if tab is not None:  # training runs the mask unit and the dense branch
            tab.charge(mask_item(self.index))
            tab.charge(branch_item(self.index))
        out = self.branch(x)
        return out * expand_mask(mask, self.tile, out.shape[-2:])

    def dense_masked(self, x: Tensor, active: Tensor) -> Tensor:
        """The reference: the dense branch where the mask is on, 0 elsewhere (what the sparse
        paths must equal; a select, not a product, so a non-finite value off the mask stays
        out as it does in the sparse paths)."""
        out = self.branch(x)
        keep = expand_mask(active.to(torch.bool), self.tile, out.shape[-2:])
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def export_forward(
        self, x: Tensor, threshold: Tensor, left: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The export face: (branch output, active units per sample [B], the MAC cap's
        allowance left after this block: `left` is None without a cap).

        Under `torch.cond`, so ONNX gets one `If` that skips the branch when no unit is active.
        Region masks keep their sparse path (NonZero, Gather, Conv on the gathered tiles,
        ScatterND); pixel masks export the dense masked product.
        """
        active = gate_open(gate_probability(self.mask_unit(x)), threshold)
        if left is not None:
            active, left = self.capped(active, left)
        units = active.flatten(1).sum(1)
        if self.granularity == "pixel":
            out = cond(
                active.any(),
                lambda x, active: self.dense_masked(x, active),
                lambda x, active: x.new_zeros((x.shape[0], self.out_channels, *x.shape[-2:])),
                (x, active),
            )
            return out, units, left
        n_h, n_w = active.shape[1:]
        h, width = x.shape[-2:]
        t, halo = self.tile, self.halo
        size = t + 2 * halo
        out_shape = (x.shape[0], self.out_channels, h, width)
        # not cached: a tensor made while tracing must not outlive the export
        inside = self._inside_tiles((h, width), x.device).repeat(x.shape[0], 1, 1, 1)

        def sparse(x: Tensor, active: Tensor, inside: Tensor) -> Tensor:
            index = torch.nonzero(active.flatten()).squeeze(1)
            torch._check(index.shape[0] > 0)  # this branch runs only when a tile is active
            padded = F.pad(x, (halo, n_w * t - width + halo, halo, n_h * t - h + halo))
            tiles = padded.unfold(2, size, t).unfold(3, size, t)  # [B, C, nH, nW, s, s]
            tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], size, size)
            tiles = tiles.index_select(0, index)
            result = self.tile_branch(tiles, inside.index_select(0, index))
            canvas = result.new_zeros(x.shape[0] * n_h * n_w, self.out_channels, t, t)
            canvas = canvas.index_copy(0, index, result)
            out = canvas.view(x.shape[0], n_h, n_w, self.out_channels, t, t)
            out = out.permute(0, 3, 1, 4, 2, 5).reshape(
                x.shape[0], self.out_channels, n_h * t, n_w * t
            )
            return out[..., :h, :width].contiguous()

        def skip(x: Tensor, active: Tensor, inside: Tensor) -> Tensor:
            return x.new_zeros(out_shape)

        return cond(active.any(), sparse, skip, (x, active, inside)), units, left

    # -- region granularity -------------------------------------------------------------------

    def _inside(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """Per tile [nH * nW, 1, th, tw]: 1 where the halo'd tile lies inside the image."""
        key = (size, device)
        if key not in self._inside_cache:
            self._inside_cache[key] = self._inside_tiles(size, device)
        return self._inside_cache[key]

    def _inside_tiles(self, size: tuple[int, int], device: torch.device) -> Tensor:
        h, w = size
        t, halo = self.tile, self.halo
        n_h, n_w = math.ceil(h / t), math.ceil(w / t)
        canvas = torch.zeros(1, 1, n_h * t + 2 * halo, n_w * t + 2 * halo, device=device)
        canvas[..., halo : halo + h, halo : halo + w] = 1.0
        tiles = canvas.unfold(2, t + 2 * halo, t).unfold(3, t + 2 * halo, t)
        return tiles.reshape(n_h * n_w, 1, t + 2 * halo, t + 2 * halo)

    def _tile_columns(self, batch: int, size: tuple[int, int], device: torch.device):
        """Where every tile's pixels live, as columns of the [C, B*H*W] view of the input.

        Returns (input columns [B*nH*nW, th*tw] with out-of-image positions clamped to the
        border, output columns [B*nH*nW, t*t] of the [C, B*nH*t*nW*t] canvas, and border
        [B*nH*nW] bool: the halo'd tile reaches outside the image).
        """
        key = ("columns", batch, size, device)
        if key not in self._inside_cache:
            h, w = size
            t, halo = self.tile, self.halo
            n_h, n_w = math.ceil(h / t), math.ceil(w / t)
            tile = torch.arange(batch * n_h * n_w, device=device)
            b, i, j = tile // (n_h * n_w), (tile // n_w) % n_h, tile % n_w
            r = torch.arange(t + 2 * halo, device=device) - halo
            ys = (i[:, None] * t + r[None, :]).clamp(0, h - 1)
            xs = (j[:, None] * t + r[None, :]).clamp(0, w - 1)
            cols_in = (b[:, None, None] * h + ys[:, :, None]) * w + xs[:, None, :]
            r = torch.arange(t, device=device)
            ys, xs = i[:, None] * t + r[None, :], j[:, None] * t + r[None, :]
            cols_out = (b[:, None, None] * n_h * t + ys[:, :, None]) * (n_w * t) + xs[:, None, :]
            border = (self._inside(size, device).flatten(1) < 1).any(1).repeat(batch)
            self._inside_cache[key] = (cols_in.flatten(1), cols_out.flatten(1), border)
        return self._inside_cache[key]

    def tile_forward(self, x: Tensor, active: Tensor) -> Tensor:
        """Gather the active halo'd tiles, run the branch on them with valid convs, scatter.

        The tiles are gathered straight from the unpadded input (one `index_select` over its
        [C, B*H*W] view, positions outside the image clamped to the border and zeroed before
        every conv that reads them) and written back with one `index_copy_`: no copy of the
        whole input, and apart from zero-filling the output all work follows the active tiles.
        """
        batch, channels, h, w = x.shape
        t, halo = self.tile, self.halo
        n_h, n_w = active.shape[1:]
        index = active.flatten().nonzero().squeeze(1)
        if index.numel() == 0:
            return x.new_zeros(batch, self.out_channels, h, w)
        n, size = index.numel(), t + 2 * halo
        cols_in, cols_out, border = self._tile_columns(batch, (h, w), x.device)
        flat = x.transpose(0, 1).reshape(channels, -1)  # a view for batch 1
        tiles = flat.index_select(1, cols_in[index].flatten()).view(channels, n, size, size)
        tiles = tiles.transpose(0, 1).contiguous()
        inside = None
        if bool(border[index].any()):
            inside = self._inside((h, w), x.device).index_select(0, index % (n_h * n_w))
        result = self.tile_branch(tiles, inside)
        out = x.new_zeros(self.out_channels, batch * n_h * t * n_w * t)
        values = result.transpose(0, 1).reshape(self.out_channels, -1).to(out.dtype)
        out.index_copy_(1, cols_out[index].flatten(), values)
        out = out.view(self.out_channels, batch, n_h * t, n_w * t).transpose(0, 1)
        return out[..., :h, :w]

    # -- pixel granularity --------------------------------------------------------------------

    def pixel_forward(self, x: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """Compute each conv at the positions the output needs (DynConv): im2col of those only.

        Returns the [B, C, H, W] output (zeros where inactive) and the MACs per sample.
        """
        batch, _, h, w = x.shape
        run = _PixelRun(x, active, self.halo)
        if not run.positions(0).numel():
            return x.new_zeros(batch, self.out_channels, h, w), run.macs
        self._pixel_slot.run = run
        try:
            rows = self.pixel_branch.forward(x)  # `.forward`: no GraphModule call wrapper
        finally:
            self._pixel_slot.run = None
        out = x.new_zeros(batch * h * w, self.out_channels)
        out.index_copy_(0, run.positions(0), rows.reshape(-1, self.out_channels).to(out.dtype))
        return out.view(batch, h, w, -1).permute(0, 3, 1, 2), run.macs


class _PixelSlot(threading.local):
    """The pixel forward in progress, shared by the branch's `PixelConv`s (one assignment),
    per thread: concurrent forwards each see their own run."""

    run: _PixelRun | None = None

    def __reduce__(self) -> tuple:
        return (type(self), ())


class PixelConv(nn.Module):
    """A branch conv in the pixel path: computed only at the positions the current run needs."""

    def __init__(self, conv: nn.Conv2d, macs: int, slot: _PixelSlot):
        super().__init__()
        self.conv = conv
        self.radius = conv_radius(conv)
        self.macs = macs  # per output position
        self.slot = slot

    def forward(self, inp: Tensor) -> Tensor:
        return self.slot.run.conv(self, inp)


class _PixelRun:
    """One pixel-granularity forward: which positions each conv of the branch computes.

    The branch is a chain, so its convs run in order; the halo of the convs still to come
    (`remaining`) says which positions a conv must compute: those that close to an active
    output position. The first conv reads the dense input; later ones read rows of positions.
    """

    def __init__(self, x: Tensor, active: Tensor, halo: int):
        self.x, self.active = x, active
        self.batch, _, self.h, self.w = x.shape
        self.remaining = halo
        self.first = True
        self.masks: dict[int, Tensor] = {}
        self.flat: dict[int, Tensor] = {}
        self.macs = torch.zeros(self.batch, dtype=torch.long, device=x.device)

    def positions(self, radius: int) -> Tensor:
        """Flat (b, y, x) indices of the positions within `radius` of an active one."""
        if radius not in self.flat:
            m = self.active.to(self.x.dtype)[:, None]
            if radius:
                m = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
            self.masks[radius] = m[:, 0] > 0
            self.flat[radius] = self.masks[radius].flatten().nonzero().squeeze(1)
        return self.flat[radius]

    def conv(self, unit: PixelConv, inp: Tensor) -> Tensor:
        conv, r = unit.conv, unit.radius
        after = self.remaining - r
        dense_input = self.first
        self.remaining, self.first = after, False
        batch, h, w = self.batch, self.h, self.w
        target = self.positions(after)
        n = target.numel()
        self.macs = self.macs + self.masks[after].flatten(1).sum(1) * unit.macs
        c_in = conv.in_channels
        if r == 0 and not dense_input:
            rows = inp.reshape(n, c_in)
            return _pointwise(rows, conv).view(n, -1, 1, 1)
        if dense_input:
            canvas = F.pad(inp, (r, r, r, r)).permute(0, 2, 3, 1).reshape(-1, c_in)
        else:
            canvas = inp.new_zeros(batch * (h + 2 * r) * (w + 2 * r), c_in)
            centre = _padded_index(self.positions(after + r), h, w, r) + r * (w + 2 * r) + r
            canvas.index_copy_(0, centre, inp.reshape(-1, c_in))
        base = _padded_index(target, h, w, r)
        if r == 0:
            return _pointwise(canvas.index_select(0, base), conv).view(n, -1, 1, 1)
        d, k = conv.dilation[0], conv.kernel_size[0]
        steps = torch.arange(k, device=inp.device) * d
        offsets = (steps[:, None] * (w + 2 * r) + steps[None, :]).flatten()
        window = (base[:, None] + offsets[None, :]).flatten()
        patches = canvas.index_select(0, window).view(n, k * k, c_in)
        return _im2col_conv(patches, conv).view(n, -1, 1, 1)


def _position_macs(node: torch.fx.Node) -> int:
    """MACs of one output position of a conv node, from the front end's count for its map."""
    return int(node.meta[MACS]) // math.prod(node.meta["tensor_meta"].shape[2:])


def _padded_index(flat: Tensor, h: int, w: int, r: int) -> Tensor:
    """Flat (b, y, x) indices into a [B, H, W] grid -> the top-left of their window in [B, H+2r, W+2r]."""
    b, rest = flat // (h * w), flat % (h * w)
    y, x = rest // w, rest % w
    return (b * (h + 2 * r) + y) * (w + 2 * r) + x


def _pointwise(rows: Tensor, conv: nn.Conv2d) -> Tensor:
    if conv.groups == 1:
        return F.linear(rows, conv.weight.flatten(1), conv.bias)
    patches = rows[:, None, :]
    return _im2col_conv(patches, conv)


def _im2col_conv(patches: Tensor, conv: nn.Conv2d) -> Tensor:
    """patches [n, k*k, C_in] x conv weight -> [n, C_out], for dense or depthwise convs."""
    n, kk, c_in = patches.shape
    weight = conv.weight
    if conv.groups == 1:
        out = patches.reshape(n, kk * c_in) @ weight.permute(0, 2, 3, 1).reshape(-1, kk * c_in).T
    elif conv.groups == c_in == conv.out_channels:
        out = (patches * weight.reshape(c_in, kk).T[None]).sum(1)
    else:  # check_branch refuses these for pixel granularity
        raise NotImplementedError("grouped convs other than depthwise have no pixel path")
    return out if conv.bias is None else out + conv.bias
