"""Dynamic convolution (CondConv, DynamicConv): each chosen conv mixes K expert kernels per sample.

A `DynamicConv` replaces one `nn.Conv2d`. A router (global average pool of the conv's input, a
two-layer MLP, softmax at a temperature) weighs K expert kernels per sample; the weighted sum is
that sample's kernel. A batch runs as one grouped convolution (the batch folded into the
channels, one group per sample and original group), which at batch 1 is the aggregated kernel
run directly. The original conv stays inside the wrapper and is what runs in `static()`.

At conversion every expert is the original kernel plus a zero-sum perturbation, and the router's
last layer is zero: the softmax is uniform, the mixture is the original kernel up to rounding,
and the network computes the original. The perturbation breaks the symmetry: identical experts
under a uniform router receive identical gradients and would never diverge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynify.runtime.ledger import mega
from dynify.runtime.model import (
    FIXED,
    CostBook,
    DynamicModel,
    ExportFace,
    JointRecipe,
    PerCall,
    PerCallRecord,
)
from dynify.train.losses import LossConfig, distillation


class Router(nn.Module):
    """Global average pool -> Linear -> ReLU -> Linear: one logit per expert.

    The last layer starts at zero, so every expert weighs 1/K until training moves it.
    """

    def __init__(self, in_channels: int, experts: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, experts)
        with torch.no_grad():  # seeded: a conversion never moves the caller's random state
            bound = in_channels**-0.5
            self.fc1.weight.copy_(
                (torch.rand(hidden, in_channels, generator=generator) * 2 - 1) * bound
            )
            self.fc1.bias.zero_()
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        # The layers' functions called directly: at batch 1 the module calls' overhead is a
        # sizeable share of a router's time (18 routers in ResNet-20).
        fc1, fc2 = self.fc1, self.fc2
        hidden = torch.relu(F.linear(x.mean((2, 3)), fc1.weight, fc1.bias))
        return F.linear(hidden, fc2.weight, fc2.bias)


class DynamicConv(nn.Module):
    """One conv turned into K experts and a router; `conv` (the original) runs in static mode.

    `calls` is the owning model's per-thread state (`PerCall`): whether this call is static, the
    router temperature of this call, and where the chosen experts are recorded.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        *,
        experts: int,
        hidden: int,
        noise: float,
        seed: int,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = conv
        self.num_experts = int(experts)
        weight = conv.weight.detach()
        perturbation = torch.randn((experts, *weight.shape), generator=generator)
        perturbation = perturbation - perturbation.mean(0, keepdim=True)  # sums to zero
        scale = float(weight.float().std()) if weight.numel() > 1 else 1.0
        experts_init = weight.unsqueeze(0) + noise * scale * perturbation.to(weight.dtype)
        self.experts = nn.Parameter(experts_init.contiguous())
        self.expert_bias = None
        if conv.bias is not None:
            self.expert_bias = nn.Parameter(conv.bias.detach().unsqueeze(0).repeat(experts, 1))
        self.router = Router(conv.in_channels, experts, hidden, generator)
        self.index = 0
        self.calls: PerCall = PerCall()

    def mixture(self, x: Tensor) -> Tensor:
        """[N, K] expert weights: softmax of the router's logits at the call's temperature."""
        temperature = getattr(self.calls, "temperature", None)
        logits = self.router(x)
        if temperature is not None:
            logits = logits / temperature.to(logits.dtype)
        return torch.softmax(logits, -1)

    def forward(self, x: Tensor) -> Tensor:
        calls = self.calls
        if calls.static:
            return self.conv(x)
        weights = self.mixture(x)
        calls.__dict__[f"weights_{self.index}"] = weights  # the model takes the argmax once
        kernels = weights @ self.experts.reshape(self.num_experts, -1)  # [N, P]
        bias = None if self.expert_bias is None else weights @ self.expert_bias  # [N, C_out]
        if getattr(calls, "exporting", False):
            return self._unfolded(x, kernels, bias)
        if x.shape[0] == 1:  # the aggregated kernel, run directly
            conv = self.conv
            return F.conv2d(
                x,
                kernels.view(self.experts.shape[1:]),
                None if bias is None else bias.view(-1),
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )
        return self._grouped(x, kernels, bias)

    def _grouped(self, x: Tensor, kernels: Tensor, bias: Tensor | None) -> Tensor:
        """The batch folded into the channels, one group per sample (and original group): one
        conv call; at batch 1 the aggregated kernel run directly."""
        conv = self.conv
        n, c, h, w = x.shape
        out = F.conv2d(
            x.reshape(1, n * c, h, w),
            kernels.reshape(n * conv.out_channels, *self.experts.shape[2:]),
            None if bias is None else bias.reshape(-1),
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups * n,
        )
        return out.reshape(n, conv.out_channels, *out.shape[2:])

    def _unfolded(self, x: Tensor, kernels: Tensor, bias: Tensor | None) -> Tensor:
        """The same convolution as patches times per-sample kernels (im2col, batched matmul):
        ONNX's Conv takes its group count as a constant, so a batch of any size cannot be one
        grouped Conv there. The same MACs."""
        conv = self.conv
        n = x.shape[0]
        g = conv.groups
        out_h, out_w = _output_size(x.shape[2:], conv)
        patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        patches = patches.reshape(n, g, -1, out_h * out_w)  # [N, g, C_in/g * kh * kw, L]
        per_group = kernels.reshape(n, g, conv.out_channels // g, -1)
        out = (per_group @ patches).reshape(n, conv.out_channels, out_h, out_w)
        if bias is not None:
            out = out + bias.reshape(n, conv.out_channels, 1, 1)
        return out


def _output_size(size: Sequence[int], conv: nn.Conv2d) -> tuple[int, int]:
    h, w = (
        (int(s) + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(
            size, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    )
    return h, w


def annealed_temperature(seen: int, start: float, end: float, samples: int) -> float:
    """DynamicConv's schedule: linear from `start` to `end` over the first `samples` trained on."""
    progress = min(1.0, seen / max(samples, 1))
    return start + (end - start) * progress


REST = "rest"


def conv_item(i: int) -> str:
    """The book's item of dynamic conv i's convolution (the original conv's MACs)."""
    return f"conv{i}"


def mixing_item(i: int) -> str:
    """The book's item of dynamic conv i's router and kernel mixing: what it adds."""
    return f"mixing{i}"


def cost_book(static_macs: int, conv_macs: Sequence[int], dynamic_macs: Sequence[int]) -> CostBook:
    """Every sample runs every part: the layers left alone, and per dynamic conv its conv and
    its router and kernel mixing (`dynamic_macs`: all three, counted on the wrapper)."""
    book = CostBook(static_macs)
    book.add(REST, static_macs - sum(conv_macs), FIXED)
    for i, (conv, dynamic) in enumerate(zip(conv_macs, dynamic_macs, strict=True)):
        book.add(conv_item(i), conv, FIXED)
        book.add(mixing_item(i), dynamic - conv, FIXED)
    return book


class DynamicConvModel(DynamicModel):
    """A network whose chosen convs are `DynamicConv`s (`dynamic_conv_<i>` in `net`).

    No thresholds: every sample runs every dynamic conv, so its cost is fixed (the static MACs
    plus each router and kernel aggregation). The decisions are each sample's heaviest expert
    per dynamic conv, int64 [N, num_convs] (`last_experts`; -1 in static mode).
    """

    strategy = "dynamic-conv"
    # The papers train experts, routers and backbone at one rate; batch norm follows the dynamic
    # convs' outputs (one BN per conv).
    joint_recipe = JointRecipe(new_parts="adam", new_lr=1e-3)
    last_experts = PerCallRecord()

    def __init__(
        self,
        net: torch.fx.GraphModule,
        wrapper_names: Sequence[str],
        *,
        conv_names: Sequence[str],
        static_macs: int,
        book: CostBook,
        input_shape: tuple[int, ...],
        num_classes: int,
        initial_temperature: float = 30.0,
        final_temperature: float = 1.0,
        anneal_samples: int = 100_000,
        distill_temperature: float = 4.0,
    ):
        super().__init__(
            static_macs=static_macs, input_shape=input_shape, num_classes=num_classes, book=book
        )
        self.net = net
        self.wrapper_names = list(wrapper_names)
        self.conv_names = list(conv_names)
        self.initial_temperature = float(initial_temperature)
        self.final_temperature = float(final_temperature)
        self.anneal_samples = int(anneal_samples)
        self.distill_temperature = float(distill_temperature)
        # The annealing schedule's state: checkpoints and artifacts carry it.
        self.register_buffer("trained_samples", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "router_temperature", torch.tensor(self.initial_temperature, dtype=torch.float32)
        )
        for i, wrapper in enumerate(self.wrappers):
            wrapper.index, wrapper.calls = i, self.per_call

    @property
    def wrappers(self) -> list[DynamicConv]:
        return [self.net.get_submodule(name) for name in self.wrapper_names]

    @property
    def num_convs(self) -> int:
        return len(self.wrapper_names)

    def dynamic_macs(self) -> int:
        """MACs of one sample in dynamic mode, the same for every sample whatever its input
        (the worst case too): the static network plus each router and kernel mixing."""
        return self.book.fixed_macs()

    def run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, chosen experts [N, num_convs]) of the dynamic or static network."""
        calls = self.per_call
        # A copy: training_loss anneals the buffer in place while autograd still needs this one.
        calls.temperature = self.router_temperature.clone()
        logits = self.net(x)
        n = x.shape[0]
        if calls.static:
            return logits, torch.full((n, self.num_convs), -1, dtype=torch.long)
        weights = [calls.__dict__.pop(f"weights_{i}") for i in range(self.num_convs)]
        chosen = torch.stack(weights, 1).argmax(-1)  # one argmax for every conv: [N, convs]
        return logits, chosen.to(torch.long)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        logits, chosen = self.run(x)
        if self.is_static:
            self.record_static(x.shape[0])
        else:  # every part is the book's fixed cost: nothing to charge
            self.close_tab(self.open_tab(x.shape[0]))
        self.last_experts = chosen.cpu()
        return logits

    def last_decisions(self) -> Tensor:
        """[N, num_convs] int64: each sample's heaviest expert per dynamic conv."""
        return self.last_experts.long()

    def describe(self) -> list[dict[str, str]]:
        """One row per dynamic conv: its kernel, experts, and what router and mixing cost."""
        rows = []
        for i, (name, w) in enumerate(zip(self.conv_names, self.wrappers, strict=True)):
            kernel = "x".join(str(d) for d in w.conv.weight.shape)
            mixing = self.book.macs(mixing_item(i))
            rows.append(
                {
                    "conv": name,
                    "kernel": kernel,
                    "experts": str(w.num_experts),
                    "MACs (dynamic)": mega(self.book.macs(conv_item(i)) + mixing, 3),
                    "extra of static": self.book.share(mixing, 4),
                }
            )
        return rows

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation (+ labels); no compute term, the cost is fixed. Each call advances the
        router temperature's annealing by the batch's samples (a buffer: checkpoints carry it)."""
        self.check_input(x)
        config = config or LossConfig()
        if teacher_logits is None:
            with torch.no_grad(), self.static():
                teacher_logits = self(x)
        logits = self(x)
        t = config.temperature(self.distill_temperature)
        loss, stats = distillation(logits, teacher_logits, labels, t, config.label_weight)
        stats.update(router_temperature=float(self.router_temperature), loss=float(loss.detach()))
        with torch.no_grad():
            self.trained_samples += x.shape[0]
            self.router_temperature.fill_(
                annealed_temperature(
                    int(self.trained_samples),
                    self.initial_temperature,
                    self.final_temperature,
                    self.anneal_samples,
                )
            )
        return loss, stats

    def export_face(self) -> DynamicConvExport:
        """The aggregated-kernel graph: no conditionals, since nothing is skipped."""
        return DynamicConvExport(self)


class DynamicConvExport(ExportFace):
    """forward(x, thresholds) -> (logits, chosen experts [N, num_convs]); the thresholds input
    is empty (a dynamic conv has none) and kept only so every export has the same inputs."""

    min_conditionals = 0

    def __init__(self, model: DynamicConvModel):
        super().__init__(model.thresholds)
        self.model = model

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        calls = self.model.per_call
        calls.exporting = True
        try:
            return self.model.run(x)
        finally:
            calls.exporting = False
