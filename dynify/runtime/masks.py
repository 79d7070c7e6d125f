"""Spatial masks over residual branches (DynConv, SACT): compute the branch only where needed.

A `MaskUnit` (a 1x1 conv on the block input) scores every position (pixel granularity) or every
t x t tile (region granularity); the `SparseResidual` wrapper replaces the block's residual
branch and computes it only at the active positions, so that the block adds zeros, i.e. passes
its shortcut on, everywhere else. Execution is really sparse, and computes the same function as
the dense masked product `branch(x) * mask` (up to float summation order):

- region: the input is zero-padded by the branch's halo (the sum of its convs' radii), the active
  tiles are gathered with their halo into a batch of small images [n, C, t + 2h, t + 2h], the
  branch runs on that batch with *valid* (unpadded) convolutions, so each conv shrinks the tile
  by its radius and the last one returns exactly the t x t centre, and the result is scattered
  back. Before every conv but the first, positions outside the image are zeroed: that is what
  the dense conv's zero padding sees there.
- pixel: the positions each conv must produce are the active mask dilated by the radii of the
  convs after it (DynConv's mask dilation). A conv gathers, for each needed position, its k x k
  neighbourhood from a zero canvas holding the previous layer's computed positions (im2col of the
  active positions only) and multiplies by the weight matrix; 1x1 convs are a plain matmul on
  the gathered rows. Elementwise layers run on the [n, C, 1, 1] rows.

Only stride-1 branches of convs with "same" zero padding, batch norm and elementwise activations
are masked; the plan skips other blocks (ResNet's stride-2 downsampling blocks) and says why.

Thresholds follow the project convention: position active iff sigmoid(score) > 1 - threshold,
so threshold 0 computes no branch at all and a threshold above 1 computes every position.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import map_arg

from dynify.runtime.model import DynamicModel

GRANULARITIES = ("pixel", "region")
# Modules and functions that act on each position independently (at inference).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
)
ELEMENTWISE_FUNCTIONS: set[Callable] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    torch.tanh,
    F.dropout,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
INIT_BIAS = 3.0  # sigmoid(3) = 0.95: a fresh mask unit keeps (almost) every position


def conv_radius(conv: nn.Conv2d) -> int:
    """How far a stride-1 'same' conv reads from its output position: dilation * (k - 1) / 2."""
    return conv.dilation[0] * (conv.kernel_size[0] - 1) // 2


def check_branch(branch: torch.fx.GraphModule, granularity: str = "region") -> str | None:
    """Why this branch cannot be masked, or None when it can.

    The branch must be a chain (each op reads one tensor) of stride-1 "same" zero-padded convs
    and position-wise ops, so that its output at a position depends only on a square window of
    its input there.
    """
    convs = 0
    for node in branch.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(tensors) != 1:
            return f"'{node.name}' combines {len(tensors)} tensors (the branch is not a chain)"
        if node.op == "call_module":
            module = branch.get_submodule(node.target)
            if isinstance(module, nn.Conv2d):
                reason = _conv_problem(module)
                grouped = module.groups not in (1, module.in_channels)
                if reason is None and granularity == "pixel" and grouped:
                    reason = f"has {module.groups} groups (pixel masks: dense or depthwise only)"
                if reason:
                    return f"conv '{node.target}' {reason}"
                convs += 1
            elif not isinstance(module, ELEMENTWISE_MODULES):
                return f"'{node.target}' is a {type(module).__name__}, not a position-wise layer"
        elif node.op == "call_function":
            if node.target not in ELEMENTWISE_FUNCTIONS:
                return f"'{node.name}' calls {getattr(node.target, '__name__', node.target)}"
        elif node.op == "call_method" and node.target not in ELEMENTWISE_METHODS:
            return f"'{node.name}' calls the method {node.target}"
    if convs == 0:
        return "it has no convolution"
    return None


def _conv_problem(conv: nn.Conv2d) -> str | None:
    k = conv.kernel_size
    if conv.stride != (1, 1):
        return f"has stride {conv.stride} (downsampling blocks are not masked)"
    if k[0] != k[1] or k[0] % 2 == 0 or conv.dilation[0] != conv.dilation[1]:
        return f"has kernel {k} and dilation {conv.dilation} (square odd kernels only)"
    if conv.padding_mode != "zeros":
        return f"pads with '{conv.padding_mode}' (zero padding only)"
    padding = conv.padding
    if padding != "same" and tuple(padding) != (conv_radius(conv),) * 2:
        return f"has padding {padding}, not 'same'"
    return None


def branch_halo(branch: torch.fx.GraphModule) -> int:
    """The branch's receptive-field radius: the sum of its convs' radii."""
    return sum(
        conv_radius(branch.get_submodule(n.target))
        for n in branch.graph.nodes
        if n.op == "call_module" and isinstance(branch.get_submodule(n.target), nn.Conv2d)
    )


def fit_tile(tile: int, spatial: tuple[int, int]) -> int:
    """The largest tile <= `tile` that divides the map (28 -> 7 and 14 -> 7 for tile 8), so no
    tile is mostly padding; down to half of `tile`, below which `tile` (clipped to the map) is used.
    """
    limit = min(tile, *spatial)
    for size in range(limit, max(1, limit // 2) - 1, -1):
        if spatial[0] % size == 0 and spatial[1] % size == 0:
            return size
    return limit


class MaskUnit(nn.Module):
    """Scores where a block's branch is needed: a 1x1 conv on the block input.

    For regions, the input is average-pooled to one value per tile first (which, the conv being
    linear, equals pooling the pixel scores). Scores are logits; sigmoid gives P(active).
    """

    def __init__(self, channels: int, granularity: str, tile: int):
        super().__init__()
        self.granularity = granularity
        self.tile = tile
        self.conv = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, INIT_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        if self.granularity == "region":
            x = F.avg_pool2d(x, self.tile, ceil_mode=True)
        return self.conv(x)[:, 0]


def gumbel_sigmoid_st(logits: Tensor, tau: float = 1.0) -> Tensor:
    """A hard 0/1 sample with the straight-through gradient of its relaxed sigmoid."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def expand_mask(mask: Tensor, tile: int, size: tuple[int, int]) -> Tensor:
    """A [B, h, w] unit mask as a [B, 1, H, W] pixel mask (tiles repeated, border cropped)."""
    if tile > 1:
        mask = mask.repeat_interleave(tile, 1).repeat_interleave(tile, 2)
    return mask[:, None, : size[0], : size[1]]


class ValidConv(nn.Module):
    """A 'same' conv run without padding on a halo'd tile, after zeroing what lies outside the
    image (the values the dense conv's zero padding would have seen)."""

    def __init__(self, conv: nn.Conv2d, zero_border: bool):
        super().__init__()
        self.conv = conv
        self.zero_border = zero_border

    def forward(self, x: Tensor, inside: Tensor | None) -> Tensor:
        if self.zero_border and inside is not None:  # None: no tile reaches the border
            c = (inside.shape[-1] - x.shape[-1]) // 2
            x = x * inside[..., c : inside.shape[-2] - c, c : inside.shape[-1] - c]
        conv = self.conv
        return F.conv2d(x, conv.weight, conv.bias, 1, 0, conv.dilation, conv.groups)


def tile_branch(branch: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The branch as a GraphModule (tiles, inside) -> centres, with every conv a ValidConv."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[str, Any] = {}
    inside = None
    for node in branch.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            inside = graph.placeholder("inside")
            continue
        if node.op == "call_module" and isinstance(branch.get_submodule(node.target), nn.Conv2d):
            conv = branch.get_submodule(node.target)
            name = "valid_" + node.target.replace(".", "_")
            zero_border = conv_radius(conv) > 0  # gathered tiles hold clamped values there
            root[name] = ValidConv(conv, zero_border)
            env[node] = graph.call_module(name, (env[node.args[0]], inside))
            continue
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        if node.op in ("call_module", "get_attr"):
            root[node.target] = operator.attrgetter(node.target)(branch)
    return torch.fx.GraphModule(root, graph, "TileBranch")


class SparseResidual(nn.Module):
    """A residual branch computed only where its mask unit says so.

    Modes: static (the dense branch, the original network), training (dense branch times a
    Gumbel straight-through mask), and eager inference (the sparse gather-run-scatter). The
    DynamicModel sets `threshold` and `static` before each forward; `fixed_mask` ([B, h, w]
    bool), when set, replaces the mask unit's decision (benchmarks, tests).
    """

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
        self.static = False
        self.threshold: Tensor | float = 0.5
        self.fixed_mask: Tensor | None = None
        self.dense_when_full = True
        self.last_macs: Tensor | None = None
        self.last_density: Tensor | None = None  # [B], fraction of units computed
        self.train_density: Tensor | None = None  # differentiable mean density (training)
        self._nodes = list(branch.graph.nodes)
        self._convs = self._conv_plan()
        self._inside_cache: dict[tuple, Tensor] = {}
        # Not registered: it re-uses the branch's modules (no second copy in the state dict).
        object.__setattr__(self, "tile_branch", tile_branch(branch))
        h, w = spatial
        self.mask_macs = in_channels * math.ceil(h / self.tile) * math.ceil(w / self.tile)

    # -- the plan of the branch's convs ------------------------------------------------------

    def _conv_plan(self) -> dict[str, dict[str, Any]]:
        """Per conv node: its radius, the radius of the convs after it, and its MACs/position."""
        convs = [
            n
            for n in self._nodes
            if n.op == "call_module" and isinstance(self.branch.get_submodule(n.target), nn.Conv2d)
        ]
        plan, after = {}, 0
        for node in reversed(convs):
            conv = self.branch.get_submodule(node.target)
            k = conv.kernel_size[0]
            plan[node.name] = {
                "radius": conv_radius(conv),
                "after": after,
                "macs": conv.out_channels * conv.in_channels // conv.groups * k * k,
                "first": node is convs[0],
            }
            after += conv_radius(conv)
        return plan

    def tile_macs(self) -> int:
        """MACs of the branch on one halo'd tile (valid convs shrink it layer by layer)."""
        size, total = self.tile + 2 * self.halo, 0
        for node in self._nodes:
            if node.name in self._convs:
                spec = self._convs[node.name]
                size -= 2 * spec["radius"]
                total += spec["macs"] * size * size
        return total

    def units(self) -> tuple[int, int]:
        h, w = self.spatial
        return math.ceil(h / self.tile), math.ceil(w / self.tile)

    # -- decisions ----------------------------------------------------------------------------

    def decide(self, x: Tensor) -> Tensor:
        """Bool [B, h, w]: which units to compute (`fixed_mask` overrides the mask unit)."""
        if self.fixed_mask is not None:
            return self.fixed_mask.to(torch.bool)
        score = torch.sigmoid(self.mask_unit(x))
        return score > 1.0 - self.threshold

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if self.static:
            self.last_macs = torch.full((batch,), self.branch_macs, dtype=torch.long)
            self.last_density = torch.ones(batch)
            return self.branch(x)
        if self.mask_unit.training:
            return self._forward_train(x)
        active = self.decide(x)
        counts = active.flatten(1).sum(1)
        self.last_density = counts.float() / active[0].numel()
        unit = 0 if self.fixed_mask is not None else self.mask_macs  # a forced mask costs nothing
        if self.dense_when_full and bool(active.all()):
            self.last_macs = torch.full((batch,), self.branch_macs + unit)
            return self.branch(x)
        if self.granularity == "region":
            out = self.tile_forward(x, active)
            self.last_macs = counts * self.tile_macs() + unit
        else:
            out, macs = self.pixel_forward(x, active)
            self.last_macs = macs + unit
        return out

    def _forward_train(self, x: Tensor) -> Tensor:
        """Dense branch times a Gumbel straight-through mask: differentiable in the mask unit."""
        mask = gumbel_sigmoid_st(self.mask_unit(x))
        self.train_density = mask.mean()
        self.last_density = mask.detach().flatten(1).mean(1)
        self.last_macs = torch.full((x.shape[0],), self.branch_macs + self.mask_macs)
        out = self.branch(x)
        return out * expand_mask(mask, self.tile, out.shape[-2:])

    def dense_masked(self, x: Tensor, active: Tensor) -> Tensor:
        """The reference: the dense branch times the mask (what the sparse paths must equal)."""
        out = self.branch(x)
        return out * expand_mask(active.to(out.dtype), self.tile, out.shape[-2:])

    # -- the branch, run by hand so convs can be replaced ------------------------------------

    def _run_branch(
        self, value: Tensor, conv_fn: Callable[[torch.fx.Node, nn.Conv2d, Tensor], Tensor]
    ):
        env: dict[torch.fx.Node, Any] = {}
        for node in self._nodes:
            if node.op == "placeholder":
                env[node] = value
                continue
            if node.op == "output":
                return env[node.args[0]]
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            if node.op == "get_attr":
                env[node] = operator.attrgetter(node.target)(self.branch)
            elif node.op == "call_module":
                module = self.branch.get_submodule(node.target)
                if node.name in self._convs:
                    env[node] = conv_fn(node, module, args[0])
                else:
                    env[node] = module(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            else:
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError("branch graph has no output")

    # -- region granularity -------------------------------------------------------------------

    def _inside(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """Per tile [nH * nW, 1, th, tw]: 1 where the halo'd tile lies inside the image."""
        key = (size, device)
        if key not in self._inside_cache:
            h, w = size
            t, halo = self.tile, self.halo
            n_h, n_w = math.ceil(h / t), math.ceil(w / t)
            canvas = torch.zeros(1, 1, n_h * t + 2 * halo, n_w * t + 2 * halo, device=device)
            canvas[..., halo : halo + h, halo : halo + w] = 1.0
            tiles = canvas.unfold(2, t + 2 * halo, t).unfold(3, t + 2 * halo, t)
            self._inside_cache[key] = tiles.reshape(n_h * n_w, 1, t + 2 * halo, t + 2 * halo)
        return self._inside_cache[key]

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
        masks: dict[int, Tensor] = {}
        flat: dict[int, Tensor] = {}
        macs = torch.zeros(batch, dtype=torch.long, device=x.device)

        def positions(radius: int) -> Tensor:
            if radius not in flat:
                m = active.to(x.dtype)[:, None]
                if radius:
                    m = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
                masks[radius] = m[:, 0] > 0
                flat[radius] = masks[radius].flatten().nonzero().squeeze(1)
            return flat[radius]

        def gather_conv(node: torch.fx.Node, conv: nn.Conv2d, inp: Tensor) -> Tensor:
            nonlocal macs
            spec = self._convs[node.name]
            r, target = spec["radius"], positions(spec["after"])
            n = target.numel()
            macs = macs + masks[spec["after"]].flatten(1).sum(1) * spec["macs"]
            c_in = conv.in_channels
            dense_input = spec["first"]
            if r == 0 and not dense_input:
                rows = inp.reshape(n, c_in)
                return _pointwise(rows, conv).view(n, -1, 1, 1)
            if dense_input:
                canvas = F.pad(inp, (r, r, r, r)).permute(0, 2, 3, 1).reshape(-1, c_in)
            else:
                canvas = inp.new_zeros(batch * (h + 2 * r) * (w + 2 * r), c_in)
                centre = _padded_index(positions(spec["after"] + r), h, w, r) + r * (w + 2 * r) + r
                canvas.index_copy_(0, centre, inp.reshape(-1, c_in))
            base = _padded_index(target, h, w, r)
            if r == 0:
                return _pointwise(canvas.index_select(0, base), conv).view(n, -1, 1, 1)
            d, k = conv.dilation[0], conv.kernel_size[0]
            steps = torch.arange(k, device=x.device) * d
            offsets = (steps[:, None] * (w + 2 * r) + steps[None, :]).flatten()
            window = (base[:, None] + offsets[None, :]).flatten()
            patches = canvas.index_select(0, window).view(n, k * k, c_in)
            return _im2col_conv(patches, conv).view(n, -1, 1, 1)

        if not positions(0).numel():
            return x.new_zeros(batch, self.out_channels, h, w), macs
        rows = self._run_branch(x, gather_conv)
        out = x.new_zeros(batch * h * w, self.out_channels)
        out.index_copy_(0, positions(0), rows.reshape(-1, self.out_channels).to(out.dtype))
        return out.view(batch, h, w, -1).permute(0, 3, 1, 2), macs


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


def distillation(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    label_weight: float,
) -> tuple[Tensor, dict[str, float]]:
    """KL to the teacher's softened distribution (x T^2), mixed with cross-entropy on labels
    (>= 0) as (1 - label_weight) * kd + label_weight * ce, as the early-exit loss does."""
    teacher = teacher_logits.detach().float()
    kd = F.kl_div(
        F.log_softmax(logits.float() / temperature, -1),
        F.softmax(teacher / temperature, -1),
        reduction="batchmean",
    ) * (temperature**2)
    known = None if labels is None else labels >= 0
    use_labels = known is not None and bool(known.any()) and label_weight > 0
    reference = labels if use_labels else teacher.argmax(-1)
    hits = (logits.detach().argmax(-1) == reference).float()
    stats = {
        "kd": float(kd.detach()),
        "acc": float(hits[known].mean() if use_labels else hits.mean()),
    }
    if not use_labels:
        return kd, stats
    ce = F.cross_entropy(logits[known].float(), labels[known])
    stats["ce"] = float(ce.detach())
    return (1.0 - label_weight) * kd + label_weight * ce, stats


class SpatialMaskModel(DynamicModel):
    """A network whose residual branches are wrapped in `SparseResidual`s.

    `net` is the rewritten graph: each masked block's branch is one call to a wrapper named
    `spatial_mask_<i>`. Per-sample MACs are the unmasked part of the network plus what every
    wrapper really computed (its mask unit and the tiles/positions it ran).
    """

    strategy = "spatial-masks"

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
        input_shape: tuple[int, ...],
        num_classes: int,
        distill_temperature: float = 4.0,
        sparsity_weight: float = 10.0,
    ):
        super().__init__(static_macs=static_macs, input_shape=input_shape, num_classes=num_classes)
        self.net = net
        self.wrapper_names = list(wrapper_names)
        self.block_names = list(block_names)
        self.granularity = granularity
        self.budget = float(budget)
        self.distill_temperature = float(distill_temperature)
        self.sparsity_weight = float(sparsity_weight)
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float32))
        self.fixed_macs = self.static_macs - sum(w.branch_macs for w in self.wrappers)

    @property
    def wrappers(self) -> list[SparseResidual]:
        return [self.net.get_submodule(name) for name in self.wrapper_names]

    @property
    def num_masks(self) -> int:
        return len(self.wrapper_names)

    def set_thresholds(self, thresholds: Sequence[float] | float) -> None:
        values = (
            [float(thresholds)] * self.num_masks
            if isinstance(thresholds, (int, float))
            else [float(v) for v in thresholds]
        )
        if len(values) != self.num_masks:
            raise ValueError(f"expected {self.num_masks} thresholds, got {len(values)}")
        self.thresholds.copy_(torch.tensor(values))

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
                    "branch MACs": f"{w.branch_macs / 1e6:.1f} M",
                    "of static": f"{w.branch_macs / self.static_macs:.3f}",
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
        try:
            out = self.net(x)
        finally:  # a wrapper called on its own afterwards is dynamic again
            for wrapper in self.wrappers:
                wrapper.static = False
        spent = torch.full((x.shape[0],), self.fixed_macs, dtype=torch.long)
        for wrapper in self.wrappers:
            spent = spent + wrapper.last_macs.to(torch.long).cpu()
        self.last_macs = spent
        return out

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
        budget: float | None = None,
        *,
        kd_temperature: float | None = None,
        label_weight: float = 0.5,
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation (+ labels) + sparsity_weight * (MAC-weighted density - target)^2.

        Masks are sampled with Gumbel straight-through noise (the mask units must be in train
        mode: `train()` or the fine-tuning loop). `budget` is a fraction of the static MACs,
        turned into the branch density that spends it; without it the strategy's `budget`
        option is the target density. Without `teacher_logits` the static network teaches.
        """
        self.check_input(x)
        if teacher_logits is None:
            with torch.no_grad(), self.static():
                teacher_logits = self(x)
        for wrapper in self.wrappers:
            wrapper.train_density = None
        logits = self(x)
        loss, stats = distillation(
            logits, teacher_logits, labels, kd_temperature or self.distill_temperature, label_weight
        )
        densities = [w.train_density for w in self.wrappers]
        if any(d is None for d in densities):
            raise RuntimeError("training_loss needs the mask units in train mode (call train()).")
        weights = torch.tensor([w.branch_macs for w in self.wrappers], dtype=torch.float32)
        mean_density = (torch.stack(densities) * weights).sum() / weights.sum()
        sparsity = (mean_density - self.budget_density(budget)) ** 2
        loss = loss + self.sparsity_weight * sparsity
        stats.update(
            density=float(mean_density.detach()),
            sparsity=float(sparsity.detach()),
            loss=float(loss.detach()),
        )
        return loss, stats

    def export_module(self) -> nn.Module:
        """The export face: forward(x, thresholds) -> (logits, active units [B, num_masks]).

        Region masks export their real sparse path (NonZero, Gather, Conv on the gathered
        tiles, ScatterND) under one `If` per block that skips the branch when no tile is
        active; pixel masks export the dense masked product (see docs/spatial.md).
        """
        return SpatialMaskExport(self)


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
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        thresholds = None
        root: dict[str, Any] = {}
        for node in dyn.net.graph.nodes:
            if node.op == "placeholder":
                env[node] = graph.placeholder(node.name)
                thresholds = graph.placeholder("thresholds")
                continue
            if node.op == "call_module" and node.target in replacements:
                root[node.target] = replacements[node.target]
                env[node] = graph.call_module(node.target, (env[node.args[0]], thresholds))
                continue
            env[node] = graph.node_copy(node, lambda arg: env[arg])
            if node.op in ("call_module", "get_attr"):
                root[node.target] = operator.attrgetter(node.target)(dyn.net)
        self.net = torch.fx.GraphModule(root, graph, "SpatialMaskExportNet")
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
