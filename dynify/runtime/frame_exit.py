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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dynify.runtime.cascade import branch_entry
from dynify.runtime.control import cond, full_index, scatter_rows, selected
from dynify.runtime.decisions import exit_decision, start_streak
from dynify.runtime.folding import use_folded
from dynify.runtime.model import FIXED, UNIT, CostBook, DynamicModel, ExportFace
from dynify.runtime.policy import ExitPolicy
from dynify.runtime.tensor_cache import cached_on_tensors
from dynify.train.losses import LossConfig, distillation

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


def cost_book(static_macs: int, frame_macs: int, frames: int, group: int = 1) -> CostBook:
    """Every clip looks at its first group; each later one is paid by the clips still looking."""
    book = CostBook(static_macs)
    for j, members in enumerate(frame_groups(range(frames), group)):
        book.add(frame_item(j), frame_macs * len(members), FIXED if j == 0 else UNIT)
    return book


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


class FrameExitModel(DynamicModel):
    strategy = "frame-exit"

    def __init__(
        self,
        network: torch.fx.GraphModule,
        frame: nn.Module,
        *,
        order: Sequence[int],
        group: int = 1,
        book: CostBook,
        policy: ExitPolicy,
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
        self.policy = policy
        self.register_buffer("temperatures", torch.ones(len(groups) - 1))

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
        """What a clip leaving after group j spends: the frames of groups 0..j."""
        return self.book.cumulative([[frame_item(j)] for j in range(len(self.groups))])

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
        state = self.policy.start(batch, x.device)
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
            done = self.policy.decide(mean, self.temperatures[j], self.thresholds[j], state)
            if done.all():
                output = mean if output is None else scatter_rows(output, remaining, mean, batch)
                exit_index[remaining] = j
                break
            if done.any():
                output = scatter_rows(output, remaining[done], mean[done], batch)
                exit_index[remaining[done]] = j
                keep = ~done
                x, total, remaining = x[keep], total[keep], remaining[keep]
                state = state.keep(keep)
        self.last_exit = exit_index
        self.close_tab(tab)
        return output

    def running_means(self, x: Tensor) -> list[Tensor]:
        """The running average of the per-frame logits after each group, for every clip."""
        means, total, frame = [], None, self.frame_network()
        for members, seen in zip(self.groups, self.frames_seen(), strict=True):
            logits = run_group(frame, x, members)
            total = logits if total is None else total + logits
            means.append(total / seen)
        return means

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
        config = config or LossConfig()
        batch = x.shape[0]
        frames = self.frame(x[:, self.order].flatten(0, 1)).unflatten(0, (batch, self.frames))
        counts = torch.arange(1, self.frames + 1, device=x.device, dtype=frames.dtype)
        means = frames.cumsum(1) / counts.view(1, -1, 1)
        means = means[:, [seen - 1 for seen in self.frames_seen()]]  # after each group
        teacher = (means[:, -1] if teacher_logits is None else teacher_logits).detach()
        temperature = config.temperature(KD_TEMPERATURE)
        losses, metrics = [], {}
        for j in range(len(self.groups)):
            name = "final" if j == self.num_exits else f"exit{j}"
            loss, stats = distillation(
                means[:, j], teacher, labels, temperature, config.label_weight
            )
            metrics[f"acc_{name}"] = stats["acc"]
            losses.append(loss)
        total = torch.stack(losses).mean()
        metrics["loss"] = float(total.detach())
        return total, metrics

    def export_face(self) -> FrameCascade:
        return FrameCascade(
            self.frame,
            self.groups,
            self.temperatures,
            self.thresholds,
            policy=self.policy.kind,
            patience=self.policy.patience,
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
        self.min_conditionals = len(self.groups) - 1

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        thr = self.thresholds_or_default(thresholds)
        state = start_streak(x.shape[0], x.device) if self.policy == "patience" else ()
        return self._stage(0, x, None, thr, state)

    def _stage(
        self, j: int, x: Tensor, total: Tensor | None, thr: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """Look at group j's frames of every clip in `x`; `total` sums the frames before them."""
        logits = run_group(self.frame, x, self.groups[j], branch_entry)
        total = logits if total is None else total + logits
        mean = total / self.seen[j]
        if j == len(self.groups) - 1:
            return mean, full_index(mean, j)
        carried = (state[0], state[1]) if self.policy == "patience" else None
        leave, carried = exit_decision(
            mean, self.temperatures[j], thr[j], self.policy, self.patience, carried
        )
        state = () if carried is None else carried

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
