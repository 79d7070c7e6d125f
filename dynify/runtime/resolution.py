"""ResolutionModel: low resolution first, full resolution only for the samples that need it.

After RANet (Yang et al. 2020), reduced to what a trained static network allows: the same
network, with the same convolution weights, first classifies an input downscaled by `scale`
(average pooling, `scale`^2 times fewer MACs for a fully convolutional network); samples whose
low-resolution prediction is confident enough (an `ExitPolicy` on temperature-scaled logits)
stop there, and the rest are run again at full resolution, batch narrowed to them.

Batch-norm statistics depend on the input resolution, so the low-resolution pass can use its own
copy of every batch norm (`low_bn`, per-resolution BN as in slimmable / resolution-switchable
networks): affine parameters and running statistics of its own, recalibrated or fine-tuned on
low-resolution inputs, and optionally its own copy of the final linear classifier (`low_head`,
RANet gives every resolution its classifier), while the full-resolution pass stays the static
network unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynify.passes.rewrite import copy_graph_replacing
from dynify.runtime.cascade import CondCascade
from dynify.runtime.control import run_on, selected
from dynify.runtime.model import FIXED, UNIT, CostBook, DynamicModel
from dynify.runtime.policy import ExitPolicy
from dynify.train.losses import LossConfig, distillation

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def downscale(x: Tensor, scale: int) -> Tensor:
    """Average-pool by an integer factor (exactly antialiased bilinear for factor 2)."""
    return x if scale == 1 else F.avg_pool2d(x, scale)


def _bn_key(target: str) -> str:
    return target.replace(".", "__")


def shadow_network(
    net: torch.fx.GraphModule, replacements: dict[str, nn.Module]
) -> torch.fx.GraphModule:
    """The same graph over the same modules, except `replacements` (target -> module)."""
    return copy_graph_replacing(net, replacements, class_name="LowResolutionNet")


class LowResolutionHead(nn.Module):
    """x -> logits of the low-resolution pass (the 'exit head' of the export cascade)."""

    def __init__(self, low_net: nn.Module, scale: int):
        super().__init__()
        self.low_net = low_net
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.low_net(downscale(x, self.scale))


LOW, FULL = "low resolution", "full resolution"


def cost_book(static_macs: int, low_macs: int) -> CostBook:
    """Every sample pays the low-resolution pass; the full one, the samples it was unsure of."""
    book = CostBook(static_macs)
    book.add(LOW, low_macs, FIXED)
    book.add(FULL, static_macs, UNIT)
    return book


# 3, as the early exits: at 4, joint fine-tuning at lr 0.01 meets a loss spike on CIFAR
# ResNet-44 that it may not recover from (benchmarks/spatial.md, the resolution cascade)
DISTILL_TEMPERATURE = 3.0


class ResolutionModel(DynamicModel):
    """Two exits: the network at 1/`scale` resolution (exit 0), then at full resolution (exit 1).

    Mirrors EarlyExitModel's interface (`num_exits`, `exit_macs`, `exit_logits`, `policy`,
    `temperatures`, `thresholds`, `last_exit`), so the same calibration applies.
    """

    strategy = "resolution"

    def __init__(
        self,
        net: torch.fx.GraphModule,
        *,
        scale: int,
        low_bn: bool,
        low_head: bool = False,
        book: CostBook,
        policy: ExitPolicy,
        threshold: float,
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        distill_temperature: float = DISTILL_TEMPERATURE,
    ):
        super().__init__(
            static_macs=static_macs,
            input_shape=input_shape,
            num_classes=num_classes,
            thresholds=[threshold],
            book=book,
        )
        self.net = net
        self.scale = int(scale)
        self.policy = policy
        self.distill_temperature = float(distill_temperature)
        self.register_buffer("temperatures", torch.ones(1))
        self.low_bn = nn.ModuleDict()
        self.low_head = nn.ModuleDict()
        modules = [n.target for n in net.graph.nodes if n.op == "call_module"]
        for target in modules:
            module = net.get_submodule(target)
            if low_bn and isinstance(module, _BN_TYPES):
                self.low_bn[_bn_key(target)] = copy.deepcopy(module)
        last = modules[-1] if modules else None
        if low_head and last is not None and isinstance(net.get_submodule(last), nn.Linear):
            self.low_head[_bn_key(last)] = copy.deepcopy(net.get_submodule(last))
        private = {**self.low_bn, **self.low_head}
        # Not a registered submodule: it only re-uses `net`'s modules and the private ones.
        object.__setattr__(
            self,
            "_low_net",
            shadow_network(net, {k.replace("__", "."): v for k, v in private.items()}),
        )

    @property
    def low_net(self) -> torch.fx.GraphModule:
        return self._low_net

    @property
    def num_exits(self) -> int:
        return 1

    @property
    def low_macs(self) -> int:
        return self.book.macs(LOW)

    def exit_macs(self) -> list[int]:
        """MACs of a sample that stops at low resolution, and of one that goes on."""
        return self.book.cumulative([[LOW], [FULL]])

    def describe(self) -> list[dict[str, str]]:
        rows = []
        for i, macs in enumerate(self.exit_macs()):
            rows.append(
                {
                    "exit": "final" if i else "0",
                    "node": "full resolution" if i else f"1/{self.scale} resolution",
                    **self.book.columns(macs),
                    "threshold": "" if i else f"{float(self.thresholds[0]):.3f}",
                }
            )
        return rows

    def train(self, mode: bool = True) -> ResolutionModel:
        """Only the low-resolution batch norms change mode; the full network stays frozen."""
        super().train(False)
        self.low_bn.train(mode)
        self.low_head.train(mode)
        self.training = mode
        return self

    def low_parameters(self) -> list[nn.Parameter]:
        """The low-resolution pass's own parameters: its batch norms' and classifier's."""
        return [*self.low_bn.parameters(), *self.low_head.parameters()]

    def low_logits(self, x: Tensor) -> Tensor:
        return self._low_net(downscale(x, self.scale))

    def exit_logits(self, x: Tensor) -> list[Tensor]:
        """Low- and full-resolution logits for every sample (calibration, training)."""
        self.check_input(x)
        return [self.low_logits(x), self.net(x)]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        batch = x.shape[0]
        if self._static:
            self.last_exit = torch.ones(batch, dtype=torch.long)
            self.record_static(batch)
            return self.net(x)
        logits = self.low_logits(x)
        state = self.policy.start(batch, x.device)
        done = self.policy.decide(logits, self.temperatures[0], self.thresholds[0], state)
        output = logits
        if not bool(done.all()):  # the full pass on the samples that did not exit
            output = run_on(self.net, x, selected(~done), logits)
        tab = self.open_tab(batch)  # every sample paid the low-resolution pass
        tab.charge(FULL, (~done).cpu())
        self.last_exit = (~done).long().cpu()
        self.close_tab(tab)
        return output

    @torch.no_grad()
    def recalibrate_low_bn(self, batches: Iterable[Tensor], max_batches: int | None = None) -> int:
        """Re-estimate the low-resolution BN statistics as exact averages over `batches`.

        Cheap (forward passes at low resolution only) and often most of the gain of per-
        resolution BN. Returns the number of batches used.
        """
        if not len(self.low_bn):
            raise ValueError("this model shares its batch norms across resolutions (low_bn=False)")
        saved = {}
        for name, bn in self.low_bn.items():
            saved[name] = bn.momentum
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: the exact mean over the batches
        was_training = self.training
        self.train(True)
        used = 0
        try:
            for x in batches:
                if max_batches is not None and used >= max_batches:
                    break
                x = x[0] if isinstance(x, (tuple, list)) else x
                self.low_logits(x)
                used += 1
        finally:
            self.train(was_training)
            for name, bn in self.low_bn.items():
                bn.momentum = saved[name]
        return used

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Distil the low-resolution logits towards the teacher (`distillation`, at the
        config's temperature or else this model's `distill_temperature`).

        With per-resolution BN the low pass has trainable state of its own (`low_parameters`).
        When the shared network trains too (joint fine-tuning: any of its parameters requires
        grad) or the batch norms are shared, the full-resolution logits are distilled as well
        (the two losses add), so the full path learns with the low one instead of drifting. No
        compute term: the threshold (calibration) meets the budget. Without `teacher_logits` the
        full network (before this step) teaches.
        """
        self.check_input(x)
        config = config or LossConfig()
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = self.net(x)
        t, weight = config.temperature(self.distill_temperature), config.label_weight
        loss, stats = distillation(self.low_logits(x), teacher_logits, labels, t, weight)
        stats = {f"{k}_low": v for k, v in stats.items()}
        if not len(self.low_bn) or any(p.requires_grad for p in self.net.parameters()):
            full, full_stats = distillation(self.net(x), teacher_logits, labels, t, weight)
            loss = loss + full
            stats.update({f"{k}_full": v for k, v in full_stats.items()})
        stats["acc"] = stats["acc_low"]
        stats["loss"] = float(loss.detach())
        return loss, stats

    def export_face(self) -> CondCascade:
        """The cascade with `torch.cond`: forward(x, thresholds) -> (logits, exit index [N]).

        The full-resolution pass sits in the false branch of an ONNX `If`, on the samples that
        did not exit (see dynify.runtime.cascade.CondCascade); every exit policy exports.
        """
        return CondCascade(
            [nn.Identity(), self.net],
            [LowResolutionHead(self._low_net, self.scale)],
            self.temperatures,
            self.thresholds,
            policy=self.policy.kind,
            patience=self.policy.patience,
        )
