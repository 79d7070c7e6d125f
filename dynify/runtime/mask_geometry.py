"""Which residual branches can be masked, and the geometry of running one on halo'd tiles.

Shared by the plan (`check_branch`), the eager sparse wrapper and its export face.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynify.passes.rewrite import copy_graph_replacing

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
    convs = {}
    for node in branch.graph.nodes:
        module = branch.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.Conv2d):
            # Gathered tiles hold clamped values where the dense conv's zero padding was.
            convs[node.target] = ValidConv(module, zero_border=conv_radius(module) > 0)
    return copy_graph_replacing(branch, convs, extra_input="inside", class_name="TileBranch")
