"""CondCascade: the export face of an early-exit network, one `torch.cond` per exit.

`torch.export` keeps each `torch.cond` and the ONNX exporter turns it into an `If` whose branches
are subgraphs, so a deployed model runs a later segment only when a sample needs it. The exit
rule is `dynify.runtime.decisions.exit_decision`, the one the eager model applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dynify.errors import ExportError
from dynify.runtime.control import cond, full_index, selected, tracing
from dynify.runtime.decisions import POLICIES, ensemble_logits, exit_decision, start_streak
from dynify.runtime.model import ExportFace

BatchPolicy = Literal["per_sample", "batch_all"]


class CondCascade(ExportFace):
    """Early-exit cascade written with `torch.cond` so export keeps the exits as control flow.

    `segments[0]` maps the image to feature 1, `segments[i]` feature i to feature i+1 and
    `segments[k]` feature k to the final logits; `heads[i]` maps feature i+1 to exit-i logits.
    Exit i is taken when the exit score of `logits_i / T_i` reaches `thresholds[i]` (`>=`), with
    the same rule as the eager runtime (`dynify.runtime.decisions.exit_decision`): max softmax for
    `"confidence"`, 1 - normalised entropy for `"entropy"`; `"patience"` (PABEE) also needs the
    last `patience` exits to agree on the class, so the previous prediction and the agreement
    streak travel through the conditionals as tensors. The returned logits are the raw head
    logits, and `exit_index` is `k` for samples that reach the end.

    Batches (N > 1): both branches of a `torch.cond` must return the same shapes, so the cond
    cannot return "only the samples that continue". The default policy `"per_sample"` keeps
    shapes fixed anyway: the predicate is "every sample exits here"; otherwise the false branch
    gathers the samples that did not exit (`nonzero` + `index_select`, a data-dependent size
    that torch.export and ONNX handle inside the branch), runs the rest of the network on them
    only and scatters their logits back (`index_copy`) into the full [N, C] tensor. Every sample
    gets exactly its own eager decision and logits, later segments run only on the samples that
    need them, and they are skipped entirely when all exit. `"batch_all"` (exit only when all
    samples are confident, everyone leaves together) is kept as a fallback for runtimes without
    NonZero/ScatterND; for N = 1 the two policies are identical.

    Outside of export/compile the conditionals run as plain Python `if`s: eager `torch.cond`
    would go through `torch.compile` and recompile for every new closure.
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        temperatures: Tensor | Sequence[float],
        thresholds: Tensor | Sequence[float],
        *,
        batch_policy: BatchPolicy = "per_sample",
        policy: str = "confidence",
        patience: int = 2,
        ensemble: Tensor | None = None,
    ) -> None:
        k = len(heads)
        if k < 1 or len(segments) != k + 1:
            raise ExportError(
                f"a cascade needs k >= 1 heads and k + 1 segments; got {len(heads)} heads "
                f"and {len(segments)} segments"
            )
        if batch_policy not in ("per_sample", "batch_all"):
            raise ExportError(f"unknown batch_policy {batch_policy!r}")
        if policy not in POLICIES:
            raise ExportError(f"cannot export exit policy {policy!r}; known: {POLICIES}")
        if policy == "patience" and batch_policy != "per_sample":
            raise ExportError("the patience policy exports with batch_policy='per_sample' only")
        temps = torch.as_tensor(temperatures, dtype=torch.float32).detach().clone().reshape(-1)
        thrs = torch.as_tensor(thresholds, dtype=torch.float32).detach().clone().reshape(-1)
        if temps.numel() != k or thrs.numel() != k:
            raise ExportError(
                f"expected {k} temperatures and {k} thresholds, got {temps.numel()} and "
                f"{thrs.numel()}"
            )
        if bool((temps <= 0).any()):
            raise ExportError(f"temperatures must be > 0, got {temps.tolist()}")
        super().__init__(thrs)
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.batch_policy: BatchPolicy = batch_policy
        self.policy = policy
        self.patience = int(patience)
        self.register_buffer("temperatures", temps)
        # ZTW's ensemble (see EarlyExitModel.combine): the heads' log-probabilities so far
        # travel through the conditionals next to the policy state.
        self.register_buffer(
            "ensemble", None if ensemble is None else ensemble.detach().clone().float()
        )

    def with_batch_policy(self, batch_policy: BatchPolicy) -> CondCascade:
        """The same cascade (shared segments and heads, same exit policy) deciding per batch
        differently, e.g. to compare "per_sample" with "batch_all" on one model."""
        return CondCascade(
            self.segments,
            self.heads,
            self.temperatures,
            self.thresholds,
            batch_policy=batch_policy,
            policy=self.policy,
            patience=self.patience,
            ensemble=self.ensemble,
        ).train(self.training)

    @property
    def num_exits(self) -> int:
        """Number of early exits k (the final classifier is exit index k)."""
        return len(self.heads)

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return `(logits [N, C], exit_index int64 [N])`; `thresholds` defaults to calibrated."""
        thr = self.thresholds_or_default(thresholds)
        feat = self.segments[0](x)
        if self.policy != "patience":
            return self._stage(0, feat, thr, (), ())
        return self._stage(0, feat, thr, start_streak(x.shape[0], x.device), ())

    def _exit_mask(
        self, i: int, logits: Tensor, thr: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Per-sample bool [N]: does the sample leave at exit i; and the updated policy state."""
        carried = (state[0], state[1]) if self.policy == "patience" else None
        leave, carried = exit_decision(
            logits, self.temperatures[i], thr[i], self.policy, self.patience, carried
        )
        return leave, (() if carried is None else carried)

    def _stage(
        self,
        i: int,
        feat: Tensor,
        thr: Tensor,
        state: tuple[Tensor, ...],
        log_probs: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor]:
        """Decide at exit i given feature i+1; `i == k` means `feat` already are final logits.
        `state`: the patience policy's tensors; `log_probs`: the ensemble's, one per head."""
        k = self.num_exits
        if i == k:
            return feat, full_index(feat, k)
        logits = self.heads[i](feat)
        if self.ensemble is not None:
            log_probs = (*log_probs, torch.log_softmax(logits.float(), -1))
            logits = ensemble_logits(self.ensemble[i], log_probs)
        leave, state = self._exit_mask(i, logits, thr, state)
        n_state = len(state)

        def take_exit(feat: Tensor, logits: Tensor, leave: Tensor, *carried: Tensor) -> tuple:
            return logits.clone(), full_index(feat, i)

        def go_on_all(feat: Tensor, logits: Tensor, leave: Tensor, *carried: Tensor) -> tuple:
            feat = branch_entry(feat)
            return self._stage(
                i + 1, self.segments[i + 1](feat), thr, carried[:n_state], carried[n_state:]
            )

        def go_on_rest(feat: Tensor, logits: Tensor, leave: Tensor, *carried: Tensor) -> tuple:
            keep = selected(~leave)  # not everyone left (else the true branch ran)
            sub = tuple(c.index_select(0, keep) for c in carried)
            sub_logits, sub_exit = self._stage(
                i + 1,
                self.segments[i + 1](branch_entry(feat.index_select(0, keep))),
                thr,
                sub[:n_state],
                sub[n_state:],
            )
            out = logits.index_copy(0, keep, sub_logits.to(logits.dtype))
            return out, full_index(feat, i).index_copy(0, keep, sub_exit)

        # With a batch fixed at one sample (a graph exported for batch 1), "not every sample
        # leaves" means "none does": per-sample bookkeeping would gather and scatter nothing,
        # and the sample's own decision is the predicate (one Reshape for Cast/ReduceMin/Cast).
        single = statically_known_true(feat.shape[0] == 1)
        go_on = go_on_rest if self.batch_policy == "per_sample" and not single else go_on_all
        every = leave.reshape(()) if single else leave.all()
        return cond(every, take_exit, go_on, (feat, logits, leave, *state, *log_probs))


def branch_entry(feat: Tensor) -> Tensor:
    """The feature as a branch receives it; when exporting, through an identity 1x1 max-pool.

    ONNX Runtime's CPU layout pass (NCHWc, its fast convolution layout) keeps a residual
    block's `Add` in the blocked layout only when every input of the `Add` comes from a node it
    converted. An `If` branch receives its input in plain NCHW, so without a converted node at
    the entry every residual block of the branch pays two reorders and runs its `Add` and `ReLU`
    unfused (CIFAR ResNet-44: ~20 us per exit passed, 1.19 instead of 1.14 latency per MAC at
    exit 1). A 1x1 max-pool is converted (`NchwcMaxPool`), so the branch's blocks chain in the
    blocked layout from their first `Add`; its own cost is one copy. Identity in value, and
    skipped outside export.
    """
    if not tracing() or feat.dim() != 4 or not feat.is_floating_point():
        return feat
    return torch.nn.functional.max_pool2d(feat, 1)
