"""EarlyExitModel: a network cut into segments, with an exit head after each but the last.

The eager forward really stops computing for samples that exited: after each exit the batch is
narrowed to the samples still undecided (gather), the next segment runs on those alone, and
results are written back in place (scatter). So a batch gives the same outputs as its samples
run one by one, and an easy batch costs less than a hard one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dynify.runtime.cascade import CondCascade
from dynify.runtime.control import scatter_rows
from dynify.runtime.decisions import ensemble_logits, exit_scores, leaves_one, reaches
from dynify.runtime.ledger import mega
from dynify.runtime.model import FIXED, UNIT, CostBook, DynamicModel
from dynify.runtime.policy import ExitPolicy
from dynify.runtime.tensor_cache import cached_on_tensors
from dynify.train.losses import LossConfig, distillation

KD_TEMPERATURE = 3.0  # the exits' own distillation temperature (LossConfig.kd_temperature None)


def segment_item(i: int) -> str:
    return f"segment{i}"


def head_item(i: int) -> str:
    return f"head{i}"


def cost_book(static_macs: int, segment_macs: Sequence[int], head_macs: Sequence[int]) -> CostBook:
    """The early-exit model's costs: segment i and head i in stage order. Every sample runs
    segment 0 and head 0 (the book's fixed cost: the cheapest exit); a later segment and its
    head are paid by the samples that did not leave before them."""
    book = CostBook(static_macs)
    for i, macs in enumerate(segment_macs):
        role = FIXED if i == 0 else UNIT
        book.add(segment_item(i), macs, role)
        if i < len(head_macs):
            book.add(head_item(i), head_macs[i], role)
    return book


class EarlyExitModel(DynamicModel):
    strategy = "early-exit"
    optional_state = ("ensemble",)

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        book: CostBook,
        exit_names: Sequence[str],
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
        if len(segments) != len(heads) + 1:
            raise ValueError("an early-exit model has one segment more than it has heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        # The book's items (`cost_book`): stage i is segment i and, but for the last, head i.
        self.segment_items = [segment_item(i) for i in range(len(segments))]
        self.head_items = [head_item(i) for i in range(len(heads))]
        self.stages = [[s, *self.head_items[i : i + 1]] for i, s in enumerate(self.segment_items)]
        self.exit_names = list(exit_names)
        self.policy = policy
        self.register_buffer("temperatures", torch.ones(len(heads)))
        # ZTW's geometric ensemble, fitted by calibration (all zero: off, heads stand alone)
        self.register_buffer("ensemble", torch.zeros(len(heads), len(heads)))

    @property
    def num_exits(self) -> int:
        """Exit heads, not counting the final classifier."""
        return len(self.heads)

    @property
    def segment_macs(self) -> list[int]:
        return [self.book.macs(s) for s in self.segment_items]

    @property
    def head_macs(self) -> list[int]:
        return [self.book.macs(h) for h in self.head_items]

    def exit_macs(self) -> list[int]:
        """MACs a sample spends if it leaves at exit i (the last entry: runs to the end).

        Every head before the exit was evaluated too, so it is counted.
        """
        return self.book.cumulative(self.stages)

    def describe(self) -> list[dict[str, str]]:
        """One row per exit for tables: where it is, what leaving there costs, its threshold."""
        rows = []
        for i, macs in enumerate(self.exit_macs()):
            final = i == self.num_exits
            rows.append(
                {
                    "exit": "final" if final else str(i),
                    "node": "output" if final else self.exit_names[i],
                    **self.book.columns(macs),
                    "head MACs": "" if final else mega(self.book.macs(self.head_items[i]), 2),
                    "threshold": "" if final else f"{float(self.thresholds[i]):.3f}",
                }
            )
        return rows

    @property
    def ensembled(self) -> bool:
        """Whether exits answer with an ensemble of the heads so far (see `combine`)."""
        return bool(self.ensemble.any())

    def combine(self, logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What each exit answers, from the raw logits of every head (and the final output).

        Without an ensemble, each head's own logits. With one (Zero Time Waste, Wolczyk et al.
        2021), exit i answers `sum_j<=i ensemble[i, j] * log_softmax(head_j)`: a weighted
        geometric mean of the heads so far, so the work of heads a sample passed is not wasted.
        The final classifier always answers alone (the static network's output).
        """
        if not self.ensembled:
            return list(logits)
        log_probs = [torch.log_softmax(lg.float(), -1) for lg in logits[:-1]]
        mixed = [
            ensemble_logits(self.ensemble[i], log_probs[: i + 1]) for i in range(len(log_probs))
        ]
        return [*mixed, logits[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self._static:
            return self._forward_static(x)
        batch = x.shape[0]
        if batch == 1 and self.policy.kind != "patience":
            return self._forward_one(x)
        tab = self.open_tab(batch, x.device)  # stage 0 is every sample's: the book's fixed cost
        remaining = torch.arange(batch, device=x.device)
        exit_index = torch.full((batch,), self.num_exits, dtype=torch.long, device=x.device)
        state = self.policy.start(batch, x.device)
        output: torch.Tensor | None = None
        feature, ensembled, log_probs = x, self.ensembled, []
        for i, segment in enumerate(self.segments):
            if i:
                for item in self.stages[i]:
                    tab.charge_rows(item, remaining)
            feature = segment(feature)
            if i == self.num_exits:
                logits = feature
                output = (
                    logits if output is None else scatter_rows(output, remaining, logits, batch)
                )
                break
            logits = self.heads[i](feature)
            if ensembled:
                log_probs.append(torch.log_softmax(logits.float(), -1))
                logits = ensemble_logits(self.ensemble[i], log_probs)
            done = self.policy.decide(logits, self.temperatures[i], self.thresholds[i], state)
            if done.all():  # all still running leave: no gather (output None: nobody left yet)
                output = (
                    logits if output is None else scatter_rows(output, remaining, logits, batch)
                )
                exit_index[remaining] = i
                break
            if done.any():
                output = scatter_rows(output, remaining[done], logits[done], batch)
                exit_index[remaining[done]] = i
                keep = ~done
                feature, remaining, state = feature[keep], remaining[keep], state.keep(keep)
                log_probs = [lp[keep] for lp in log_probs]
        self.last_exit = exit_index
        self.close_tab(tab)
        return output

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        """One sample: the same decisions as `forward` without its index bookkeeping (arange,
        gathers, scatters, per-exit masks), which costs ~0.1 ms per exit passed: 2 % of a CIFAR
        ResNet per exit, enough to keep saved MACs from becoming saved milliseconds. Without an
        ensemble the decision is taken in Python floats (`exit_score_one`), as the tensor path
        takes it (`dynify.runtime.decisions.leaves_one`, whose tie rule hands a score too close to
        its threshold to the tensor rule)."""
        kind, ensembled, temperatures, thresholds = self._decision_constants()
        taken, feature, log_probs = self.num_exits, x, []
        tab = self.open_tab(1, scalar=True)
        for i, segment in enumerate(self.segments):
            if i:
                for item in self.stages[i]:
                    tab.charge(item)
            feature = segment(feature)
            if i == self.num_exits:
                break
            logits = self.heads[i](feature)
            if ensembled:
                log_probs.append(torch.log_softmax(logits.float(), -1))
                logits = ensemble_logits(self.ensemble[i], log_probs)
                leave = bool(
                    reaches(exit_scores(logits, self.temperatures[i], kind), thresholds[i])
                )
            else:
                leave = leaves_one(
                    logits, temperatures[i], thresholds[i], kind, self.temperatures[i]
                )
            if leave:
                taken, feature = i, logits
                break
        self.close_tab(tab, taken)
        return feature

    def _decision_constants(self) -> tuple[str, bool, list[float], list[float]]:
        """(policy kind, ensembled, temperatures, thresholds) as Python values, cached until a
        buffer changes (in place or replaced): reading them from tensors costs ops per exit."""
        buffers = self._buffers  # not Module.__getattr__: this runs on every forward
        return cached_on_tensors(
            self,
            "_decision_cache",
            (buffers["temperatures"], buffers["thresholds"], buffers["ensemble"]),
            lambda: (
                self.policy.kind,
                self.ensembled,
                self.temperatures.tolist(),
                self.thresholds.tolist(),
            ),
            extra=(self.policy.kind,),
        )

    def export_face(self) -> CondCascade:
        """A `CondCascade` (forward(x, thresholds) -> (logits, exit index [N])) with one
        `torch.cond` per exit and this model's exit policy, segments and heads."""
        return CondCascade(
            list(self.segments),
            list(self.heads),
            self.temperatures,
            self.thresholds,
            policy=self.policy.kind,
            patience=self.policy.patience,
            ensemble=self.ensemble if self.ensembled else None,
        )

    def _forward_static(self, x: torch.Tensor) -> torch.Tensor:
        for segment in self.segments:
            x = segment(x)
        self.last_exit = torch.full((x.shape[0],), self.num_exits, dtype=torch.long)
        self.record_static(x.shape[0])
        return x

    def exit_logits(self, x: torch.Tensor, *, raw: bool = False) -> list[torch.Tensor]:
        """Logits at every exit and at the end, for all samples (training and calibration):
        what each exit answers (`combine`), or with `raw` each head's own logits."""
        self.check_input(x)
        outputs = []
        feature = x
        for i, segment in enumerate(self.segments):
            feature = segment(feature)
            outputs.append(self.heads[i](feature) if i < self.num_exits else feature)
        return outputs if raw else self.combine(outputs)

    def training_loss(
        self,
        x: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Self-distillation (SDN-style) over every trainable output, for one batch.

        Each exit (and the final classifier when it trains) gets `distillation` towards the
        teacher; the losses are averaged. No compute term: exits spend what the thresholds let
        them. Segments whose parameters are all frozen run under no_grad, so with a frozen
        backbone one pass feeds every head. Without `teacher_logits` the model's own final
        output (detached) is the teacher: right when the backbone is frozen, since it then is
        the static network.
        """
        self.check_input(x)
        config = config or LossConfig()
        outputs, feature, grad = [], x, torch.is_grad_enabled()
        for i, segment in enumerate(self.segments):
            trains = feature.requires_grad or any(p.requires_grad for p in segment.parameters())
            with torch.set_grad_enabled(grad and trains):
                feature = segment(feature)
            outputs.append(self.heads[i](feature) if i < self.num_exits else feature)
        teacher = (outputs[-1] if teacher_logits is None else teacher_logits).detach()
        temperature = config.temperature(KD_TEMPERATURE)
        losses, metrics = [], {}
        for i, logits in enumerate(outputs):
            name = "final" if i == self.num_exits else f"exit{i}"
            loss, stats = distillation(logits, teacher, labels, temperature, config.label_weight)
            metrics[f"acc_{name}"] = stats["acc"]
            if i == self.num_exits and not logits.requires_grad:
                continue  # a frozen final classifier has nothing to learn
            losses.append(loss)
        total = torch.stack(losses).mean()
        metrics["loss"] = float(total.detach())
        return total, metrics
