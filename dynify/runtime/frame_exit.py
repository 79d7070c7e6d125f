"""FrameExitModel: a clip model that looks at its frames one at a time and stops once sure.

The frames are looked at in the plan's order, in groups of `group` frames (default 1) run as
one batch: after group j a clip's answer is the running average of the per-frame logits seen so
far, and the exit policy (`dynify.runtime.policy`, rules in `dynify.runtime.decisions`) decides
on it whether to stop. So the model is an exit cascade (`ExitCascade`) with one exit per group
but the last: `exit_logits` are the running averages, `exit_macs()[j]` is the frames of groups
0..j, and calibration and evaluation treat it like early exits. Groups of 2 or more trade the
finer granularity for throughput: at batch 1 a frame network like a CIFAR ResNet runs 2 frames
in much less than twice the time of one.

The eager forward really skips the frames after a clip's exit: the batch narrows to the clips
still looking (gather), the next frame runs on those alone, and answers are scattered back.
Static mode runs the traced original graph: every frame at once and `mean(1)`, bit-exact.

`FrameGateModel` decides instead with a small learned gate per decision (FrameExit, Ghodrati et
al. CVPR 2021): an MLP on the running average and its sorted probabilities, trained to tell
whether the running prediction already is the all-frame one, deciding by the contract's gate
rule (`gate_open`: look further when p > 1 - threshold). Its score is not a function of the
exit's logits alone, so it is no `ExitCascade` but a `GatedExits`: every gate's logits come in
one pass with the running averages, and calibration simulates the gate rule on them to search
one threshold per gate.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dynify.runtime.cascade import branch_entry
from dynify.runtime.control import cond, full_index, scatter_rows, selected
from dynify.runtime.decisions import exit_decision, gate_open, gate_probability, start_streak
from dynify.runtime.folding import use_folded
from dynify.runtime.mac_cap import CapHolder
from dynify.runtime.model import DECIDER, FIXED, UNIT, CostBook, DynamicModel, ExportFace, Tab
from dynify.runtime.policy import ExitPolicy, PolicyState
from dynify.runtime.tensor_cache import cached_on_tensors
from dynify.train.losses import LossConfig, distillation

GATE_TARGETS = ("final", "correct")

KD_TEMPERATURE = 3.0  # the running averages' own distillation temperature


def frame_item(j: int) -> str:
    """The book's item of the j-th group of frames looked at (a frame when groups are 1)."""
    return f"frame{j}"


def frame_groups(order: Sequence[int], group: int) -> list[list[int]]:
    """The order cut into consecutive groups of `group` frames (the last may be shorter)."""
    if group < 1:
        raise ValueError("group must be at least 1 frame")
    order = [int(i) for i in order]
    return [order[i : i + group] for i in range(0, len(order), group)]


def gate_item(j: int) -> str:
    """The book's item of the exit gate deciding after group j."""
    return f"gate{j}"


def cost_book(
    static_macs: int, frame_macs: int, frames: int, group: int = 1, gate_macs: int | None = None
) -> CostBook:
    """Every clip looks at its first group; each later one is paid by the clips still looking.
    With `gate_macs`, a gate after every group but the last, paid by the clips deciding there."""
    book = CostBook(static_macs)
    groups = frame_groups(range(frames), group)
    for j, members in enumerate(groups):
        book.add(frame_item(j), frame_macs * len(members), FIXED if j == 0 else UNIT)
        if gate_macs is not None and j < len(groups) - 1:
            book.add(gate_item(j), gate_macs, DECIDER)
    return book


class ExitGate(nn.Module):
    """FrameExit's gate after one group of frames: from the running average of the per-frame
    logits [N, K] and its sorted probabilities, the logit [N] of "look further" (the running
    prediction is not yet the one the whole clip gives). Nothing in it depends on the data's
    shape, so it exports as it runs."""

    def __init__(self, num_classes: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, mean: Tensor) -> Tensor:
        mean = mean.float()
        probs = torch.softmax(mean, dim=-1).sort(dim=-1, descending=True).values
        return self.net(torch.cat([mean, probs], dim=-1)).squeeze(-1)


def looks_further(gate: nn.Module, mean: Tensor, threshold: Tensor | float) -> Tensor:
    """bool [N]: the clips whose gate opens (the gate rule, `gate_open`): they look at the
    next group. A gate that scores NaN stays shut: the clip leaves, as with exit policies."""
    return gate_open(gate_probability(gate(mean)), threshold)


def run_group(
    frame: nn.Module,
    x: Tensor,
    group: Sequence[int],
    entry: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The summed per-frame logits of the frames `group` of clips `x`, run as one batch
    (`entry`, if given, is applied to that batch first)."""
    if len(group) == 1:
        batch = x[:, group[0]]
    else:
        batch = torch.stack([x[:, t] for t in group], 1).flatten(0, 1)
    logits = frame(batch if entry is None else entry(batch))
    if len(group) == 1:
        return logits
    return logits.unflatten(0, (x.shape[0], len(group))).sum(1)


def running_mean_distillation(
    means: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    config: LossConfig | None,
) -> tuple[Tensor, dict[str, float]]:
    """The distillation loss of every running average [N, groups, K] towards the teacher
    (without one, the all-frame average, detached), averaged over the groups."""
    config = config or LossConfig()
    teacher = (means[:, -1] if teacher_logits is None else teacher_logits).detach()
    temperature = config.temperature(KD_TEMPERATURE)
    losses, metrics = [], {}
    last = means.shape[1] - 1
    for j in range(means.shape[1]):
        name = "final" if j == last else f"exit{j}"
        loss, stats = distillation(means[:, j], teacher, labels, temperature, config.label_weight)
        metrics[f"acc_{name}"] = stats["acc"]
        losses.append(loss)
    total = torch.stack(losses).mean()
    metrics["loss"] = float(total.detach())
    return total, metrics


def gate_targets(means: Tensor, labels: Tensor | None, target: str) -> Tensor:
    """float [N, groups - 1]: 1 where the clip should look further after group j, i.e. its
    running prediction is not yet the all-frame one ("final": self-distillation, no labels
    needed), or not yet right ("correct", FrameExit's target; clips without a label, -1,
    fall back to the all-frame prediction)."""
    reference = means[:, -1].argmax(-1)
    if target == "correct" and labels is not None:
        reference = torch.where(labels >= 0, labels.to(reference.device), reference)
    return (means[:, :-1].argmax(-1) != reference[:, None]).float()


def balanced_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with both classes weighed alike within each gate (column): early
    gates see mostly "look further", late ones mostly "stop", and an unweighted loss would
    teach each to answer its majority."""
    positives = targets.mean(0, keepdim=True).clamp(0.02, 0.98)
    weights = torch.where(targets > 0.5, 0.5 / positives, 0.5 / (1.0 - positives))
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (weights * loss).mean()


class FrameLoop(DynamicModel):
    """What both frame-exit models share: the frames looked at group by group, the clips that
    leave dropped from the batch, the cost book, static mode. A subclass says how a clip
    decides to leave (`_start`, `_leaves`, `_keep`)."""

    strategy = "frame-exit"

    def __init__(
        self,
        network: torch.fx.GraphModule,
        frame: nn.Module,
        *,
        order: Sequence[int],
        group: int = 1,
        book: CostBook,
        thresholds: Sequence[float],
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
        groups = frame_groups(order, group)
        if sorted(order) != list(range(len(order))) or len(groups) != len(thresholds) + 1:
            raise ValueError(
                "order must be a permutation of the frames, one threshold per group but the last"
            )
        self.network = network  # the traced original: static mode
        self.frame = frame  # the per-frame network, sharing the original's parameters
        self.order = [int(i) for i in order]
        self.group = int(group)
        self.groups = groups

    @property
    def frames(self) -> int:
        return len(self.order)

    @property
    def num_exits(self) -> int:
        """Exits after every group but the last (index `num_exits`: every frame seen)."""
        return len(self.groups) - 1

    @property
    def frame_macs(self) -> int:
        """One frame through the per-frame network."""
        return self.book.macs(frame_item(0)) // len(self.groups[0])

    def frames_seen(self) -> list[int]:
        """How many frames a clip leaving at each exit (and the last) has looked at."""
        seen, counts = 0, []
        for members in self.groups:
            seen += len(members)
            counts.append(seen)
        return counts

    def frame_network(self) -> nn.Module:
        """The per-frame network the eager loop runs: `frame` itself, or under inference
        (`use_folded`) a copy with each BN folded into its conv. Frames run at batch 1 or a
        few, where a ResNet's time goes largely to per-op dispatch, so dropping the BN ops pays
        (about a tenth of a CIFAR ResNet-44 frame). The copy lives in `__dict__` (not a
        submodule: not in the state dict) and is rebuilt when any of `frame`'s tensors change.
        """
        if not use_folded(self):
            return self.frame
        sources = [
            t
            for module in self._frame_modules()
            for registry in (module._parameters, module._buffers)
            for name, t in registry.items()
            if name != "num_batches_tracked"  # no part of an eval forward
        ]
        return cached_on_tensors(self, "_folded_frame", sources, self._fold_frame)

    def _frame_modules(self) -> list[nn.Module]:
        """`frame`'s modules, listed once: their registries are read on each forward without
        walking the module tree (export may swap a module's registries, never its modules)."""
        modules = self.__dict__.get("_frame_module_list")
        if modules is None:
            modules = self.__dict__["_frame_module_list"] = list(self.frame.modules())
        return modules

    def _fold_frame(self) -> nn.Module:
        with torch.no_grad():
            folded = fuse(self.frame, no_trace=isinstance(self.frame, torch.fx.GraphModule))
        return folded.eval().requires_grad_(False)

    def exit_macs(self) -> list[int]:
        """What a clip leaving after group j spends: the frames of groups 0..j (and the gates
        that decided after them)."""
        stages = [
            [frame_item(j), *([gate_item(j)] if gate_item(j) in self.book.items else [])]
            for j in range(len(self.groups))
        ]
        return self.book.cumulative(stages)

    def describe(self) -> list[dict[str, str]]:
        """One row per exit: after which frame, what leaving there costs, its threshold."""
        rows = []
        seen = self.frames_seen()
        for j, macs in enumerate(self.exit_macs()):
            final = j == self.num_exits
            rows.append(
                {
                    "exit": "final" if final else str(j),
                    "frame": ",".join(str(t) for t in self.groups[j]),
                    "frames seen": str(seen[j]),
                    **self.book.columns(macs),
                    "threshold": "" if final else f"{float(self.thresholds[j]):.3f}",
                }
            )
        return rows

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self._static:
            out = self.network(x)
            self.last_exit = full_index(x, self.num_exits)
            self.record_static(x.shape[0], x.device)
            return out
        batch, last = x.shape[0], self.num_exits
        remaining = torch.arange(batch, device=x.device)
        exit_index = torch.full((batch,), last, dtype=torch.long, device=x.device)
        state = self._start(batch, x.device)
        output: Tensor | None = None
        total: Tensor | None = None
        tab = self.open_tab(batch, x.device)  # the first frame is every clip's
        frame, seen = self.frame_network(), self.frames_seen()
        for j, members in enumerate(self.groups):
            if j:
                tab.charge_rows(frame_item(j), remaining)
            logits = run_group(frame, x, members)
            total = logits if total is None else total + logits
            mean = total / seen[j]
            if j == last:
                output = mean if output is None else scatter_rows(output, remaining, mean, batch)
                break
            done = self._leaves(j, mean, state, tab, remaining)
            if done.all():
                output = mean if output is None else scatter_rows(output, remaining, mean, batch)
                exit_index[remaining] = j
                break
            if done.any():
                output = scatter_rows(output, remaining[done], mean[done], batch)
                exit_index[remaining[done]] = j
                keep = ~done
                x, total, remaining = x[keep], total[keep], remaining[keep]
                state = self._keep(state, keep)
        self.last_exit = exit_index
        self.close_tab(tab)
        return output

    def _start(self, batch: int, device: torch.device) -> Any:
        """What the decisions remember about the clips, before the first."""
        return None

    @abstractmethod
    def _leaves(self, j: int, mean: Tensor, state: Any, tab: Tab, remaining: Tensor) -> Tensor:
        """bool [n]: which of the clips still looking (`remaining`, rows of the batch) leave
        after group j, whose running average is `mean`; charges what deciding costs."""

    def _keep(self, state: Any, keep: Tensor) -> Any:
        return state

    def running_means(self, x: Tensor) -> list[Tensor]:
        """The running average of the per-frame logits after each group, for every clip."""
        means, total, frame = [], None, self.frame_network()
        for members, seen in zip(self.groups, self.frames_seen(), strict=True):
            logits = run_group(frame, x, members)
            total = logits if total is None else total + logits
            means.append(total / seen)
        return means

    def prefix_means(self, x: Tensor) -> Tensor:
        """[N, groups, K]: the running average after each group, every frame run as one batch
        through the per-frame network as it is (training: differentiable if it learns)."""
        batch = x.shape[0]
        frames = self.frame(x[:, self.order].flatten(0, 1)).unflatten(0, (batch, self.frames))
        counts = torch.arange(1, self.frames + 1, device=x.device, dtype=frames.dtype)
        means = frames.cumsum(1) / counts.view(1, -1, 1)
        return means[:, [seen - 1 for seen in self.frames_seen()]]


class FrameExitModel(FrameLoop):
    """Exits by an exit policy on the running average (`ExitCascade`): calibration simulates
    the rule on every exit's logits, collected in one pass."""

    def __init__(
        self, network: torch.fx.GraphModule, frame: nn.Module, *, policy: ExitPolicy, **kwargs: Any
    ):
        super().__init__(network, frame, **kwargs)
        self.policy = policy
        self.register_buffer("temperatures", torch.ones(len(self.groups) - 1))

    def _start(self, batch: int, device: torch.device) -> PolicyState:
        return self.policy.start(batch, device)

    def _leaves(
        self, j: int, mean: Tensor, state: PolicyState, tab: Tab, remaining: Tensor
    ) -> Tensor:
        return self.policy.decide(mean, self.temperatures[j], self.thresholds[j], state)

    def _keep(self, state: PolicyState, keep: Tensor) -> PolicyState:
        return state.keep(keep)

    def exit_logits(self, x: Tensor) -> list[Tensor]:
        """What every exit answers (calibration): the running averages, group by group."""
        self.check_input(x)
        return self.running_means(x)

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The distillation loss of every running average towards the teacher, averaged.

        The per-frame network (the only parameters) learns to be right from fewer frames.
        Without `teacher_logits` the all-frame average (detached) teaches.
        """
        self.check_input(x)
        return running_mean_distillation(self.prefix_means(x), teacher_logits, labels, config)

    def export_face(self) -> FrameCascade:
        return FrameCascade(
            self.frame,
            self.groups,
            self.temperatures,
            self.thresholds,
            policy=self.policy.kind,
            patience=self.policy.patience,
        )


class FrameGateModel(CapHolder, FrameLoop):
    """Exits by a learned gate after each group but the last (FrameExit): the gate reads the
    running average and says whether to look further; a clip leaves when it does not
    (`looks_further`: the contract's gate rule, threshold 0 the cheapest, above 1 every
    frame). The gates train with the per-frame network frozen (`finetune`, heads mode).

    With a MAC cap (`set_mac_cap`, `dynify.runtime.mac_cap`) a clip looks at a further group
    only if its frames fit what is left of the allowance (the floor: the first group and every
    gate). Every group costs every clip the same, so the cap is a last group, `deepest_group`:
    there every clip leaves without asking its gate. `static()` ignores the cap.
    """

    optional_state = ("mac_cap",)

    def __init__(
        self,
        network: torch.fx.GraphModule,
        frame: nn.Module,
        *,
        hidden: int = 16,
        target: str = "final",
        **kwargs: Any,
    ):
        super().__init__(network, frame, **kwargs)
        if target not in GATE_TARGETS:
            raise ValueError(f"gate target must be one of {GATE_TARGETS}")
        self.target = target
        self.gates = nn.ModuleList(
            ExitGate(self.num_classes, hidden) for _ in range(len(self.groups) - 1)
        )
        self.init_mac_cap()

    def cap_floor(self) -> int:
        """The first group of frames and every gate charged: the least MAC cap there can be."""
        return self.book.floor()

    def deepest_group(self, cap: int | None = None) -> int:
        """The last group a clip may look at under the MAC cap `cap` (default: the model's):
        the groups after the first are paid from the allowance in order, while they fit."""
        cap = self.cap_macs() if cap is None else cap
        if cap is None:
            return self.num_exits
        left, deepest = cap - self.cap_floor(), 0
        for j in range(1, len(self.groups)):
            left -= self.book.macs(frame_item(j))
            if left < 0:
                break
            deepest = j
        return deepest

    def _start(self, batch: int, device: torch.device) -> int:
        return self.deepest_group()

    def _leaves(self, j: int, mean: Tensor, state: int, tab: Tab, remaining: Tensor) -> Tensor:
        if j >= state:  # the cap: the next group does not fit, so the gate is not asked
            return torch.ones(remaining.shape[0], dtype=torch.bool, device=mean.device)
        tab.charge_rows(gate_item(j), remaining)
        return ~looks_further(self.gates[j], mean, self.thresholds[j])

    def gate_logits(self, x: Tensor) -> list[Tensor]:
        """Every gate's logit [N] ("look further") for every clip, all frames run."""
        return self.gated_exit_outputs(x)[0]

    def gated_exit_outputs(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(every gate's logit [N], every exit's running average [N, K]), all frames run:
        what calibration simulates the gate rule on (`GatedExits`)."""
        self.check_input(x)
        means = self.running_means(x)
        return [gate(mean) for gate, mean in zip(self.gates, means, strict=False)], means

    def exit_macs(self) -> list[int]:
        """What a clip leaving after group j spends: groups 0..j and the gates asked after
        them; under the MAC cap no gate is asked after the deepest group."""
        costs = super().exit_macs()
        deepest = self.deepest_group()
        if deepest < self.num_exits:
            costs[deepest] -= self.book.macs(gate_item(deepest))
        return costs

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Each gate learns, by class-balanced binary cross-entropy, whether the running
        prediction after its group is not yet the all-frame average's (or, with
        `target="correct"` and labels, not yet right). The per-frame network learns too
        (the running averages distilled, as `FrameExitModel`'s) only if it is trainable
        (joint fine-tuning); frozen (heads mode) it runs without gradients."""
        self.check_input(x)
        learns = any(p.requires_grad for p in self.frame.parameters())
        with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
            means = self.prefix_means(x)
        targets = gate_targets(means.detach(), labels, self.target)
        logits = torch.stack(
            [gate(means[:, j].detach()) for j, gate in enumerate(self.gates)], dim=1
        )
        loss = balanced_bce(logits, targets)
        look = logits.detach() > 0.0
        metrics = {
            "gate_loss": float(loss.detach()),
            "gate_acc": float((look == (targets > 0.5)).float().mean()),
            "look_further": float(targets.mean()),
        }
        if learns:
            distilled, stats = running_mean_distillation(means, teacher_logits, labels, config)
            loss = loss + distilled
            metrics.update(stats)
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def export_face(self) -> FrameGateCascade:
        return FrameGateCascade(
            self.frame, self.groups, self.gates, self.thresholds, deepest=self.deepest_group()
        )


class FrameCascade(ExportFace):
    """The export face: one `torch.cond` per exit over the groups of frames still to look at.

    `forward(x, thresholds) -> (logits, exit index [N])`, deciding like the eager model
    (`dynify.runtime.decisions.exit_decision` on the running average). For a batch, the false
    branch gathers the clips that go on, runs the rest on them and scatters their answers back,
    as `CondCascade` does for early exits.
    """

    def __init__(
        self,
        frame: nn.Module,
        groups: Sequence[Sequence[int]],
        temperatures: Tensor,
        thresholds: Tensor,
        *,
        policy: str,
        patience: int,
    ):
        super().__init__(thresholds)
        self.frame = frame
        self.groups = [[int(t) for t in members] for members in groups]
        self.seen = [sum(len(m) for m in self.groups[: j + 1]) for j in range(len(self.groups))]
        self.policy = policy
        self.patience = int(patience)
        self.register_buffer("temperatures", temperatures.detach().clone().float())
        # the last group any clip looks at (a MAC cap's; a Python int, so export keeps it)
        self.deepest = len(self.groups) - 1

    @property
    def min_conditionals(self) -> int:  # type: ignore[override]
        """One conditional per group a clip may leave after."""
        return self.deepest

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        thr = self.thresholds_or_default(thresholds)
        state = start_streak(x.shape[0], x.device) if self.policy == "patience" else ()
        return self._stage(0, x, None, thr, state)

    def _leave(
        self, j: int, mean: Tensor, thr: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """bool [N]: which clips leave after group j, and what the rule carries on."""
        carried = (state[0], state[1]) if self.policy == "patience" else None
        leave, carried = exit_decision(
            mean, self.temperatures[j], thr[j], self.policy, self.patience, carried
        )
        return leave, (() if carried is None else carried)

    def _stage(
        self, j: int, x: Tensor, total: Tensor | None, thr: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """Look at group j's frames of every clip in `x`; `total` sums the frames before them."""
        logits = run_group(self.frame, x, self.groups[j], branch_entry)
        total = logits if total is None else total + logits
        mean = total / self.seen[j]
        if j >= self.deepest:  # the last group, or the last the MAC cap allows
            return mean, full_index(mean, j)
        leave, state = self._leave(j, mean, thr, state)

        def take_exit(x: Tensor, total: Tensor, mean: Tensor, leave: Tensor, *st: Tensor):
            return mean.clone(), full_index(mean, j)

        def go_on_all(x: Tensor, total: Tensor, mean: Tensor, leave: Tensor, *st: Tensor):
            return self._stage(j + 1, x, total, thr, st)

        def go_on_rest(x: Tensor, total: Tensor, mean: Tensor, leave: Tensor, *st: Tensor):
            keep = selected(~leave)
            sub = tuple(s.index_select(0, keep) for s in st)
            sub_logits, sub_exit = self._stage(
                j + 1, x.index_select(0, keep), total.index_select(0, keep), thr, sub
            )
            out = mean.index_copy(0, keep, sub_logits.to(mean.dtype))
            return out, full_index(mean, j).index_copy(0, keep, sub_exit)

        single = statically_known_true(x.shape[0] == 1)
        go_on = go_on_all if single else go_on_rest
        every = leave.reshape(()) if single else leave.all()
        return cond(every, take_exit, go_on, (x, total, mean, leave, *state))


class FrameGateCascade(FrameCascade):
    """`FrameGateModel`'s export face: `FrameCascade` deciding by the gates
    (`looks_further`, thresholds an input)."""

    def __init__(
        self,
        frame: nn.Module,
        groups: Sequence[Sequence[int]],
        gates: nn.ModuleList,
        thresholds: Tensor,
        *,
        deepest: int | None = None,
    ):
        super().__init__(
            frame,
            groups,
            torch.ones(len(gates)),
            thresholds,
            policy="confidence",  # unused: the gates decide
            patience=1,
        )
        self.gates = gates
        if deepest is not None:
            self.deepest = int(deepest)

    def _leave(
        self, j: int, mean: Tensor, thr: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return ~looks_further(self.gates[j], mean, thr[j]), state
