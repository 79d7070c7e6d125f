"""Dynamic width: each sample runs a residual branch's inner channels up to a width it needs.

A `WidthBranch` replaces a residual branch conv -> BN -> ReLU -> conv (-> BN). The pass has
permuted the inner channels by importance (conv1's output channels, BN1's, conv2's input
channels: a permutation inside the branch changes nothing it computes), so width c is the
contiguous prefix of c channels and runs as dense, smaller convolutions on weight slices. A
`WidthGate` (global average pool of the branch input -> linear -> one logit per width) picks the
width per sample with `decisions.width_index`; the samples of a batch are grouped by width
(gather, run, scatter back).

Faces: the eager forward really runs the narrow convolutions; `training_loss` runs the full
branch with a straight-through (Gumbel-softmax) one-hot choice turned into a channel mask after
the ReLU (zeroed channels are exactly the narrow convolution); the export face puts each width
under `torch.cond` (ONNX: an `If` per width and block). Static mode computes the original
network bit-exactly: it runs the branch with the weights gathered back into their original
order (the same values, the same convolution, so the same bits).

Costs are the model's cost book (`dynify.runtime.ledger`): per branch its narrowest width is
`FIXED` (every sample runs it), its gate a `DECIDER`, and the rest of its full width a `UNIT`
that a sample running width w is charged `width_macs[w] - width_macs[0]` of; the layers outside
the branches are `FIXED` too. So the book's floor is every gate run and every branch at its
narrowest width, and its worst case every branch at full width.

With a MAC cap (`set_mac_cap`, the arithmetic of `dynify.runtime.mac_cap`) a sample's allowance
is the cap minus the floor (every gate run, every branch at its narrowest width); the branches
decide in the order the forward meets them, and a branch's width choice is clamped to the
widest whose cost above the narrowest fits what is left, which it then uses up. Eager batches,
batch 1 and the export face apply the same rule, per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynify.errors import StrategyError
from dynify.runtime import mac_cap
from dynify.runtime.control import cond, scatter_rows, selected, tracing
from dynify.runtime.decisions import straight_through_choice, width_index, width_index_one
from dynify.runtime.ledger import DECIDER, FIXED, UNIT, CostBook, Tab
from dynify.runtime.mac_cap import CapHolder
from dynify.runtime.model import DynamicModel, ExportFace, JointRecipe, PerCall, PerCallRecord
from dynify.runtime.tensor_cache import cached_on_tensors
from dynify.train.losses import (
    LossConfig,
    budget_price,
    distillation,
    priced_compute,
    step_metrics,
)

# The threshold at which training prices its deterministic decisions (the median width).
GREEDY_THRESHOLD = 0.5
REST = "rest"  # the cost book's item of the layers outside the sliced branches


def narrowest_item(index: int) -> str:
    """The cost book's item of branch `index` at its narrowest width (`FIXED`)."""
    return f"narrowest{index}"


def gate_item(index: int) -> str:
    """The cost book's item of branch `index`'s width gate (`DECIDER`)."""
    return f"gate{index}"


def widening_item(index: int) -> str:
    """The cost book's item of branch `index`'s channels beyond its narrowest width (`UNIT`)."""
    return f"widening{index}"


def enter_branch(book: CostBook, index: int, width_macs: Sequence[int], gate_macs: int) -> None:
    """Enter branch `index`'s costs in `book`: its narrowest width, its gate, the rest of its
    full width."""
    book.add(narrowest_item(index), width_macs[0], FIXED)
    book.add(gate_item(index), gate_macs, DECIDER)
    book.add(widening_item(index), width_macs[-1] - width_macs[0], UNIT)


class WidthGate(nn.Module):
    """Global average pool -> Linear: one logit per width.

    The bias starts in favour of the full width (`full_bias`), so a converted model at the
    default thresholds computes close to the original until fine-tuning teaches the gate.
    """

    def __init__(self, in_channels: int, widths: int, generator: torch.Generator, full_bias: float):
        super().__init__()
        self.fc = nn.Linear(in_channels, widths)
        with torch.no_grad():  # seeded: a conversion never moves the caller's random state
            bound = 0.1 * in_channels**-0.5
            self.fc.weight.copy_(
                (torch.rand(widths, in_channels, generator=generator) * 2 - 1) * bound
            )
            self.fc.bias.zero_()
            self.fc.bias[-1] = full_bias

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean((2, 3))
        if torch.is_grad_enabled() or tracing():
            return self.fc(pooled)
        weight = cached_on_tensors(self, "weight_t", (self.fc.weight,), self._transposed)
        return torch.addmm(self.fc.bias, pooled, weight)  # one op: F.linear is two at batch 1

    def _transposed(self) -> Tensor:
        return self.fc.weight.detach().t().contiguous()


@dataclass(frozen=True)
class BranchWidths:
    """One sliced branch as the model runs it (read-only): `widths` the inner channel counts a
    sample may run, narrowest first; `width_macs[w]` what width w costs one sample; `gate_macs`
    what its gate costs when it runs."""

    index: int
    join: str
    widths: tuple[int, ...]
    width_macs: tuple[int, ...]
    gate_macs: int

    @property
    def num_widths(self) -> int:
        return len(self.widths)


@dataclass
class WidthRun:
    """What the wrappers of one forward share (kept per thread on the model's `PerCall`)."""

    mode: str  # "eager" | "train" | "export"
    thresholds: Tensor
    # what each sample spent (`dynify.runtime.ledger`): float64 (eager), float32 with
    # gradient (train), a scalar tab at batch 1; None in the export face, which counts nothing
    tab: Tab | None = None
    chosen: Tensor | None = None  # [N, K] int64: each sample's width index per branch
    greedy: Tab | None = None  # train: the MACs of the deterministic decisions
    temperature: float = 1.0
    # batch 1 in eager mode: decisions and MACs as Python scalars (no tensor bookkeeping)
    scalar: bool = False
    thr: list[float] = field(default_factory=list)
    chosen_one: list[int] = field(default_factory=list)
    # the MAC cap (`dynify.runtime.mac_cap`): each sample's allowance left, [N] float64 (a
    # float at batch 1), or None without a cap
    left: Tensor | float | None = None


class WidthBranch(nn.Module):
    """A residual branch conv1 -> bn1 -> ReLU -> conv2 (-> bn2) run at a per-sample width.

    `conv1`, `bn1`, `conv2`, `bn2` hold the branch's parameters with the inner channels in
    importance order (`order[i]`: the original channel now at position i); `widths` are the
    inner channel counts a sample may run, narrowest first; `width_macs[w]` what width w costs
    one sample (the branch's MACs from the front end, scaled for the slices that run): the
    table its charges to the cost book's `widening` item are read from.
    """

    def __init__(
        self,
        index: int,
        conv1: nn.Conv2d,
        bn1: nn.BatchNorm2d,
        conv2: nn.Conv2d,
        bn2: nn.BatchNorm2d | None,
        *,
        order: Sequence[int],
        widths: Sequence[int],
        width_macs: Sequence[int],
        gate: WidthGate,
        book: CostBook,
    ):
        super().__init__()
        self.index = index
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        perm = torch.as_tensor(list(order), dtype=torch.long)
        self.register_buffer("order", perm)
        self.register_buffer("inverse", torch.argsort(perm))
        self.widths = [int(c) for c in widths]
        self.width_macs = [int(m) for m in width_macs]
        self.gate = gate
        self.book = book  # the model's cost book (plain data, shared)
        if (
            book.macs(narrowest_item(index)) != self.width_macs[0]
            or book.macs(widening_item(index)) != self.width_macs[-1] - self.width_macs[0]
        ):
            raise StrategyError(
                f"Branch {index}'s width costs disagree with the cost book; convert again."
            )
        self.calls: PerCall = PerCall()  # the owning model's per-thread state
        # [W, C] 1.0 where inner channel c is inside width w: a one-hot choice times this is
        # the training mask.
        inner = torch.arange(conv1.out_channels)
        prefix = (inner.unsqueeze(0) < torch.tensor(self.widths).unsqueeze(1)).float()
        self.register_buffer("prefix", prefix, persistent=False)

    @property
    def num_widths(self) -> int:
        return len(self.widths)

    def extra_repr(self) -> str:
        return f"index={self.index}, widths={self.widths}"

    @property
    def gate_macs(self) -> int:
        """What the gate costs one sample (the cost book's `DECIDER` item)."""
        return self.book.macs(gate_item(self.index))

    def _charge(self, tab: Tab, choice: Tensor) -> None:
        """Charge each sample the channels it ran beyond the narrowest width (int64 [N])."""
        table = torch.tensor(self.extra_macs, dtype=torch.float64, device=choice.device)
        tab.charge_amount(widening_item(self.index), table[choice])

    # --- the computations ---------------------------------------------------------------------
    def original(self, x: Tensor) -> Tensor:
        """The original branch exactly: the parameters gathered back into the original order."""
        inv = self.inverse
        c1, b1, c2 = self.conv1, self.bn1, self.conv2
        h = F.conv2d(
            x,
            c1.weight.index_select(0, inv),
            None if c1.bias is None else c1.bias.index_select(0, inv),
            c1.stride,
            c1.padding,
            c1.dilation,
        )
        h = F.batch_norm(
            h,
            b1.running_mean.index_select(0, inv),
            b1.running_var.index_select(0, inv),
            None if b1.weight is None else b1.weight.index_select(0, inv),
            None if b1.bias is None else b1.bias.index_select(0, inv),
            False,
            0.0,
            b1.eps,
        )
        h = torch.relu(h)
        h = F.conv2d(h, c2.weight.index_select(1, inv), c2.bias, c2.stride, c2.padding, c2.dilation)
        return self._bn2(h)

    def narrow(self, x: Tensor, width: int) -> Tensor:
        """The branch on its first `width` inner channels: dense convolutions on weight slices."""
        c1, b1, c2 = self.conv1, self.bn1, self.conv2
        w1, bias1, mean, var, gamma, beta, w2 = self._slices(width)
        h = F.conv2d(x, w1, bias1, c1.stride, c1.padding, c1.dilation)
        h = F.batch_norm(h, mean, var, gamma, beta, False, 0.0, b1.eps)
        h = torch.relu(h)
        h = F.conv2d(h, w2, c2.bias, c2.stride, c2.padding, c2.dilation)
        return self._bn2(h)

    def _slices(self, width: int) -> tuple[Tensor | None, ...]:
        """conv1's, BN1's and conv2's parameters cut to `width` inner channels. Without
        autograd, kept between calls until a source tensor changes (at batch 1 the slicing ops
        cost as much as a small op each); conv2's slice is made contiguous, since a strided
        weight sends the convolution down a slower path."""
        c1, b1, c2 = self.conv1, self.bn1, self.conv2
        sources = (c1.weight, c1.bias, b1.running_mean, b1.running_var, b1.weight, b1.bias)

        def build() -> tuple[Tensor | None, ...]:
            cut = tuple(None if t is None else t[:width] for t in sources)
            w2 = c2.weight if width == c2.in_channels else c2.weight[:, :width].contiguous()
            return (*cut, w2)

        if torch.is_grad_enabled() or tracing():
            return build()
        with torch.no_grad():
            return cached_on_tensors(self, f"slices_{width}", (*sources, c2.weight), build)

    def _bn2(self, h: Tensor) -> Tensor:
        b2 = self.bn2
        if b2 is None:
            return h
        return F.batch_norm(
            h, b2.running_mean, b2.running_var, b2.weight, b2.bias, False, 0.0, b2.eps
        )

    def masked(self, x: Tensor, mask: Tensor) -> Tensor:
        """Training: the full branch (its modules, so batch norm follows its train/eval mode)
        with the inner channels scaled by `mask` [N, C] after the ReLU."""
        h = torch.relu(self.bn1(self.conv1(x))) * mask.to(x.dtype)[:, :, None, None]
        h = self.conv2(h)
        return h if self.bn2 is None else self.bn2(h)

    # --- the forward --------------------------------------------------------------------------
    def forward(self, entry: Tensor) -> Tensor:
        calls = self.calls
        run: WidthRun | None = getattr(calls, "width_run", None)
        if calls.static or run is None:
            return self.original(entry)
        if run.mode == "train":
            return self._train(entry, run)
        if run.scalar:
            return self._one(entry, run)
        if run.mode == "export":
            return self._export(entry, run)
        full = self.num_widths - 1
        threshold = run.thresholds[self.index]
        if float(threshold) > 1.0 and run.left is None:  # full width everywhere: no gate
            run.chosen[:, self.index] = full
            run.tab.charge(widening_item(self.index))
            return self.narrow(entry, self.widths[full])
        if float(threshold) > 1.0:  # full width asked for, the cap may narrow it: no gate
            choice = torch.full((len(entry),), full, dtype=torch.long, device=entry.device)
        else:
            choice = width_index(self.gate(entry), threshold)
            run.tab.charge(gate_item(self.index))
        choice = self._cap(choice, run)
        run.chosen[:, self.index] = choice
        self._charge(run.tab, choice)
        present = torch.unique(choice).tolist()
        if len(present) == 1:
            return self.narrow(entry, self.widths[present[0]])
        out = None
        for w in present:
            index = torch.nonzero(choice == w).squeeze(1)
            out = scatter_rows(
                out, index, self.narrow(entry.index_select(0, index), self.widths[w]), len(entry)
            )
        return out

    def _one(self, entry: Tensor, run: WidthRun) -> Tensor:
        """Batch 1, the latency case: one sync for the decision, MACs as Python ints."""
        full = self.num_widths - 1
        w = full
        threshold = run.thr[self.index]
        if not threshold > 1.0:
            logits = self.gate(entry)
            w = width_index_one(
                logits.tolist()[0],
                threshold,
                lambda: int(width_index(logits, run.thresholds[self.index])[0]),
            )
            run.tab.charge(gate_item(self.index))
        if run.left is not None:
            w = mac_cap.widest_that_fits_one(w, self.extra_macs, run.left)
            run.left -= self.extra_macs[w]
        run.chosen_one[self.index] = w
        run.tab.charge_amount(widening_item(self.index), self.extra_macs[w])
        return self.narrow(entry, self.widths[w])

    def _export(self, entry: Tensor, run: WidthRun) -> Tensor:
        """Each width under `torch.cond`: run when some sample chose it, on those samples only
        (gathered inside the `If`), scattered into the output."""
        choice = self._cap(width_index(self.gate(entry), run.thresholds[self.index]), run)
        run.chosen[:, self.index] = choice
        out = entry.new_zeros((entry.shape[0], *self._out_shape(entry)))
        for w, width in enumerate(self.widths):

            def run_width(entry: Tensor, mask: Tensor, out: Tensor, width: int = width) -> Tensor:
                index = selected(mask)
                return out.index_copy(0, index, self.narrow(entry.index_select(0, index), width))

            def skip(entry: Tensor, mask: Tensor, out: Tensor) -> Tensor:
                return out.clone()

            mask = choice == w
            out = cond(mask.any(), run_width, skip, (entry, mask, out))
        return out

    @property
    def extra_macs(self) -> list[int]:
        """What each width costs above the narrowest (the narrowest is in the cap's floor)."""
        return [m - self.width_macs[0] for m in self.width_macs]

    def _cap(self, choice: Tensor, run: WidthRun) -> Tensor:
        """The width choices under the MAC cap: each clamped to the widest that fits what is
        left of the sample's allowance, which it then uses up (`dynify.runtime.mac_cap`)."""
        if run.left is None:
            return choice
        extra = torch.tensor(self.extra_macs, dtype=torch.float64, device=choice.device)
        choice = mac_cap.widest_that_fits(choice, extra, run.left)
        run.left = run.left - extra[choice]
        return choice

    def _out_shape(self, entry: Tensor) -> tuple:
        size = entry.shape[2:]
        for conv in (self.conv1, self.conv2):
            size = [
                (s + 2 * p - d * (k - 1) - 1) // st + 1
                for s, p, d, k, st in zip(
                    size, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
                )
            ]
        return (self.conv2.out_channels, *size)

    def _train(self, entry: Tensor, run: WidthRun) -> Tensor:
        """Every sample runs the full branch; a straight-through one-hot choice of width masks
        the inner channels. The gate reads a detached entry: the compute term must teach the
        gate, not train the backbone's features to look cheap."""
        logits = self.gate(entry.detach()).float()
        choice = straight_through_choice(logits, run.temperature)  # [N, W]
        extra = torch.tensor(self.extra_macs, dtype=choice.dtype, device=choice.device)
        run.tab.charge(gate_item(self.index))
        run.tab.charge_amount(widening_item(self.index), choice @ extra)
        run.greedy.charge(gate_item(self.index))
        self._charge(run.greedy, width_index(logits.detach(), GREEDY_THRESHOLD))
        run.chosen[:, self.index] = choice.detach().argmax(-1)
        return self.masked(entry, choice @ self.prefix)


class DynamicWidthModel(CapHolder, DynamicModel):
    """The rewritten graph (`net`) with `width_<k>` wrappers over the chosen residual branches.

    One threshold per branch (0: the narrowest width for every sample, above 1: full width for
    every sample, without running the gate). Decisions: each sample's width index per branch,
    int64 [N, K] (`last_widths`). With a MAC cap (`set_mac_cap`) each choice is clamped to the
    widest that fits the sample's allowance (see the module docstring); `static()` ignores it.
    """

    strategy = "dynamic-width"
    last_widths = PerCallRecord()
    optional_state = ("budget_multiplier", "mac_cap")

    def __init__(
        self,
        net: torch.fx.GraphModule,
        wrapper_names: Sequence[str],
        *,
        joins: Sequence[str],
        book: CostBook,
        thresholds: Sequence[float],
        budget: float,
        temperature: float,
        distill_temperature: float,
        compute_weight: float,
        budget_rate: float,
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
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
        self.joins = list(joins)
        self.budget = float(budget)
        self.temperature = float(temperature)
        self.distill_temperature = float(distill_temperature)
        self.compute_weight = float(compute_weight)
        self.budget_rate = float(budget_rate)
        self.register_buffer("budget_multiplier", torch.zeros((), dtype=torch.float64))
        self.init_mac_cap()
        for wrapper in self.wrappers:
            wrapper.calls = self.per_call

    # The gates learn at Adam's pace; batch norm keeps the statistics the slices were cut from.
    joint_recipe = JointRecipe(
        new_parts="adam", new_lr=0.01, clip_grad_norm=2.0, freeze_batchnorm=True
    )

    @property
    def wrappers(self) -> list[WidthBranch]:
        return [self.net.get_submodule(name) for name in self.wrapper_names]

    @property
    def num_branches(self) -> int:
        return len(self.wrapper_names)

    @property
    def fixed_macs(self) -> int:
        """What the layers outside the sliced branches cost one sample."""
        return self.book.macs(REST)

    def width_plan(self) -> tuple[BranchWidths, ...]:
        """The sliced branches, in the order the forward meets them (`last_decisions()`'s
        columns)."""
        return tuple(
            BranchWidths(w.index, join, tuple(w.widths), tuple(w.width_macs), w.gate_macs)
            for w, join in zip(self.wrappers, self.joins, strict=True)
        )

    def force_width(self, index: int) -> None:
        """Make every gate certain of width `index` (0 the narrowest; -1 the full width) for
        every sample, and set the thresholds to 0.5: the gates still run and are charged. For
        timing what each width costs apart from what training teaches the gates; it overwrites
        the gates' parameters, so fine-tuning or converting again undoes it."""
        for w in self.wrappers:
            if not -w.num_widths <= index < w.num_widths:
                raise StrategyError(
                    f"Branch {w.index} has {w.num_widths} widths {w.widths}; width index "
                    f"{index} is not one of them."
                )
        with torch.no_grad():
            for w in self.wrappers:
                w.gate.fc.weight.zero_()
                w.gate.fc.bias.zero_()
                w.gate.fc.bias[index] = 30.0
        self.set_thresholds(0.5)

    def min_macs(self) -> int:
        """Every gate run and every branch at its narrowest width (the cost book's floor)."""
        return self.book.floor()

    def cap_floor(self) -> int:
        """What a sample spends whatever it decides, every gate charged (`min_macs`): the
        least MAC cap there can be (`dynify.runtime.mac_cap`)."""
        return self.book.floor()

    def last_decisions(self) -> Tensor:
        """[N, num_branches] int64: the width index (0 the narrowest) each sample ran."""
        if self.last_widths is None:
            raise StrategyError("No dynamic forward has run in this thread yet.")
        return self.last_widths.long()

    def unit_probabilities(self, x: Tensor) -> list[Tensor]:
        """Differentiable in `x`: per branch, the probability [B] its gate gives the full width,
        on the static network's features. A branch runs at full width exactly when the
        cumulative probability of the narrower widths, 1 - p, is below its threshold, i.e.
        p > 1 - threshold: what a slowdown attack pushes every branch over (as with gates)."""
        inputs = self.static_inputs_of(self.wrappers, x)
        return [
            torch.softmax(w.gate(entry).float(), -1)[:, -1]
            for w, entry in zip(self.wrappers, inputs, strict=True)
        ]

    def describe(self) -> list[dict[str, str]]:
        """One row per dynamic-width branch."""
        rows = []
        for w, join, t in zip(self.wrappers, self.joins, self.thresholds.tolist(), strict=True):
            rows.append(
                {
                    "branch": str(w.index),
                    "join": join,
                    "widths": "/".join(str(c) for c in w.widths),
                    "MACs by width": " / ".join(f"{m / 1e6:.2f}" for m in w.width_macs) + " M",
                    "gate MACs": str(w.gate_macs),
                    "threshold": f"{t:.3f}",
                }
            )
        return rows

    # --- running ------------------------------------------------------------------------------
    def _run(self, x: Tensor, run: WidthRun | None) -> Tensor:
        calls = self.per_call
        calls.width_run = run
        try:
            return self.net(x)
        finally:
            calls.width_run = None

    def _new_run(self, x: Tensor, mode: str, thresholds: Tensor, tab: Tab | None) -> WidthRun:
        n = x.shape[0]
        return WidthRun(
            mode=mode,
            thresholds=thresholds,
            tab=tab,
            chosen=torch.zeros(n, self.num_branches, dtype=torch.long, device=x.device),
            temperature=self.temperature,
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        n = x.shape[0]
        if self.is_static:
            out = self._run(x, None)
            self.record_static(n)
            self.last_widths = torch.tensor(
                [[w.num_widths - 1 for w in self.wrappers]] * n, dtype=torch.long
            ).reshape(n, self.num_branches)
            return out
        if n == 1:
            run = WidthRun(
                mode="eager",
                thresholds=self.thresholds,
                tab=self.open_tab(1, scalar=True),
                scalar=True,
                thr=self.thresholds.tolist(),
                chosen_one=[0] * self.num_branches,
            )
            cap = self.cap_macs()
            if cap is not None:
                run.left = float(cap - self.cap_floor())
            out = self._run(x, run)
            self.last_widths = torch.tensor([run.chosen_one], dtype=torch.long)
            self.close_tab(run.tab)
            return out
        run = self._new_run(x, "eager", self.thresholds, self.open_tab(n))
        run.left = self.allowance(self.cap_macs(), x)
        out = self._run(x, run)
        self.close_tab(run.tab)
        self.last_widths = run.chosen.cpu()
        return out

    # --- training -----------------------------------------------------------------------------
    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation (+ labels) under straight-through width choices, plus a compute term:
        `price * mean MAC fraction`, the price following the distance of the deterministic
        decisions' MACs (the median width) from the budget (`budget_price`, a PI controller)."""
        self.check_input(x)
        config = config or LossConfig()
        budget = self.budget if config.budget is None else float(config.budget)
        if teacher_logits is None:
            with torch.no_grad(), self.static():
                teacher_logits = self(x)
        n = x.shape[0]
        run = self._new_run(x, "train", self.thresholds, self.open_tab(n, dtype=torch.float32))
        run.greedy = self.open_tab(n)
        logits = self._run(x, run)
        t = config.temperature(self.distill_temperature)
        task, stats = distillation(logits, teacher_logits, labels, t, config.label_weight)
        fraction = run.tab.spent / self.static_macs
        greedy_fraction = float(run.greedy.spent.mean()) / self.static_macs
        price = budget_price(
            self.budget_multiplier, greedy_fraction - budget, self.compute_weight, self.budget_rate
        )
        compute = priced_compute(fraction, price)
        loss = task + compute
        self.close_tab(run.tab)
        self.last_widths = run.chosen.cpu()
        return loss, step_metrics(
            loss,
            compute,
            stats,
            macs_fraction=float(fraction.mean().detach()),
            greedy_macs_fraction=greedy_fraction,
            compute_price=price,
        )

    # --- export -------------------------------------------------------------------------------
    def export_face(self) -> DynamicWidthExport:
        """forward(x, thresholds) -> (logits, width index [N, K] int64), widths under cond."""
        return DynamicWidthExport(self)


class DynamicWidthExport(ExportFace):
    """`DynamicWidthModel` with each width of each branch under `torch.cond` (an ONNX `If`).

    The gates always run and decide from `thresholds` (a graph input) with the same rule as
    the eager forward; a width's convolutions run only when some sample of the batch chose it.
    """

    def __init__(self, model: DynamicWidthModel):
        super().__init__(model.thresholds)
        self.model = model
        # the MAC cap as it is now: a Python int, so the export keeps it as a constant
        self.cap = model.cap_macs()

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        model = self.model
        run = model._new_run(x, "export", self.thresholds_or_default(thresholds), None)
        run.left = model.allowance(self.cap, x)
        logits = model._run(x, run)
        return logits, run.chosen.to(torch.int64)
