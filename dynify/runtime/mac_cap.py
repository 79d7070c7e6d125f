"""A per-sample MAC cap for strategies whose decision units run one after another (block gates,
spatial masks, dynamic width, skip-rnn, frame-exit's gates): the arithmetic, written once for
every face.

The rule. Before a forward, each sample's *allowance* is the cap minus the model's floor: what
a sample spends whatever it decides (the unconditional layers, and every decision unit
charged as if it ran: gates' deciders, the policy network, mask units). The units then decide
in the order the forward meets them; the work a unit asks for (a gated branch, a mask's tiles
or positions) is done only if it fits what is left of the sample's allowance, which it then
uses up:
- a gate whose branch does not fit closes (halting: the sample halts there, as ACT does);
- a mask whose units do not fit keeps its first k active units in raster order, k the most
  whose cost is sure to fit (k x the dearest cost one unit can add);
- a width choice (dynamic width) is clamped to the widest that fits (the narrowest is in the
  floor);
- a state update (skip-rnn) that does not fit is skipped, the state copied;
- a group of frames (frame-exit's gates) that does not fit is not looked at: the clip leaves.
Whatever the input (NaN, inf, 3e38) and the thresholds, a sample never spends more than the
cap: the floor is paid at most once, and nothing else is done without fitting. The rule is
per sample and in a fixed order, so a batch decides as its samples do alone, and the eager,
batch-1 and export faces apply these same functions. A model without a cap skips all of it.

The cap is held as an int64 buffer `mac_cap` (MACs; -1: none), so `.half()` leaves it alone
and artifacts carry it; `CapHolder` gives a model `set_mac_cap(fraction | None)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dynify.errors import StrategyError
from dynify.runtime.model import DynamicModel, ExitCascade, MacCapped, PerSampleExits

NO_CAP = -1


def cap_in_macs(fraction: float, static_macs: int, floor: int) -> int:
    """The cap `fraction` of the static MACs, in MACs; refuses one below the floor."""
    try:
        value = float(fraction)
    except (TypeError, ValueError) as exc:
        raise StrategyError(
            f"A MAC cap is a fraction of the static MACs, got {fraction!r}."
        ) from exc
    if not math.isfinite(value) or value <= 0:
        raise StrategyError(
            f"A MAC cap is a positive fraction of the static MACs (e.g. 0.6), got {fraction}."
        )
    cap = math.floor(value * static_macs)
    if cap < floor:
        raise StrategyError(
            f"A MAC cap of {value:.3f} of the static MACs is below the cheapest a sample can "
            f"spend, {floor / static_macs:.4f} (every skippable unit skipped, every decision unit "
            f"paid); give --mac-cap {math.ceil(floor / static_macs * 1e4) / 1e4:.4f} or more."
        )
    return cap


def allowance(cap: int, floor: int, batch: int, device: torch.device) -> Tensor:
    """[B] float64: what each sample may spend beyond the floor."""
    return torch.full((batch,), float(cap - floor), dtype=torch.float64, device=device)


def fits(left: Tensor, cost: Tensor | float) -> Tensor:
    """Bool [B]: the work of `cost` MACs fits what is left of each sample's allowance."""
    return torch.as_tensor(cost, dtype=torch.float64, device=left.device) <= left


def spend(left: Tensor, cost: Tensor | float, ran: Tensor) -> Tensor:
    """The allowance left after the samples of `ran` spent `cost` each."""
    cost = torch.as_tensor(cost, dtype=torch.float64, device=left.device)
    return left - torch.where(ran, cost, torch.zeros_like(cost))


def units_that_fit(left: Tensor, unit_cost: int) -> Tensor:
    """Int64 [B]: how many units of at most `unit_cost` MACs each fit the allowance."""
    return torch.floor(left.clamp_min(0.0) / max(int(unit_cost), 1)).to(torch.int64)


def keep_first(active: Tensor, count: Tensor) -> Tensor:
    """`active` [B, ...] with only its first `count` [B] True units per sample (raster order)."""
    flat = active.flatten(1)
    rank = torch.cumsum(flat.to(torch.int64), 1)
    return (flat & (rank <= count[:, None])).view_as(active)


def widest_that_fits(choice: Tensor, extra: Tensor, left: Tensor) -> Tensor:
    """Int64 [B]: each sample's choice among alternatives of rising cost (`extra` [W] MACs above
    the cheapest, 0 first) clamped to the widest at most `choice` whose extra cost fits `left`."""
    index = torch.arange(extra.shape[0], device=choice.device)
    ok = (extra.to(torch.float64)[None, :] <= left[:, None]) & (index[None, :] <= choice[:, None])
    return torch.where(ok, index[None, :], torch.zeros_like(index)[None, :]).amax(1)


def widest_that_fits_one(choice: int, extra: list[int], left: float) -> int:
    """`widest_that_fits` of one sample in Python numbers (batch 1)."""
    return max(j for j in range(choice + 1) if j == 0 or float(extra[j]) <= left)


class CapHolder:
    """Mixed into a DynamicModel: the `mac_cap` buffer and `set_mac_cap` (`runtime.model.MacCapped`).

    The model defines `cap_floor()`, the MACs a sample spends whatever it decides, every
    decision unit charged.
    """

    mac_cap: Tensor
    static_macs: int

    def init_mac_cap(self) -> None:
        self.register_buffer("mac_cap", torch.tensor(NO_CAP, dtype=torch.int64))  # type: ignore[attr-defined]

    def cap_floor(self) -> int:
        raise NotImplementedError

    def set_mac_cap(self, fraction: float | None) -> None:
        """Cap every sample's MACs at `fraction` of the static model's, whatever its input and
        the thresholds; None removes the cap. Refuses a cap below `cap_floor()`."""
        value = (
            NO_CAP
            if fraction is None
            else cap_in_macs(fraction, self.static_macs, self.cap_floor())
        )
        self.mac_cap.fill_(value)

    def mac_cap_fraction(self) -> float | None:
        """The cap as a fraction of the static MACs, or None."""
        cap = int(self.mac_cap)
        return None if cap < 0 else cap / self.static_macs

    def cap_macs(self) -> int | None:
        """The cap in MACs, or None (read once per forward: a Python int)."""
        cap = int(self.mac_cap)
        return None if cap < 0 else cap

    def allowance(self, cap: int | None, x: Tensor) -> Tensor | None:
        """[B] float64: what each sample of the batch `x` may spend beyond `cap_floor()` under
        the cap `cap` (MACs: the model's now, or the one an export face holds); None: no cap."""
        if cap is None:
            return None
        return allowance(cap, self.cap_floor(), x.shape[0], x.device)


@dataclass(frozen=True)
class CostBound:
    """What one sample can spend, as `describe` output and the CLI print it.

    `worst`: `worst_case_macs()`, any input and any thresholds. `cap`: the bound the current
    settings guarantee for every input, or None: the MAC cap a `MacCapped` model holds,
    or the cost of an exit cascade's forced exit (threshold 0, as `calibrate(mac_cap=)` sets
    it; not under the patience policy, whose exits never fire unconditionally). `how`: how a
    cascade holds it ("forced exit 2"), empty for a `MacCapped` model.
    `fixed`: nothing decides what a sample spends (a strategy without thresholds, dynamic
    convs): every sample costs `worst`, and there is nothing to cap.
    """

    worst: int
    cap: int | None
    how: str
    fixed: bool

    @property
    def label(self) -> str:
        """ "MAC cap", or "MAC cap (forced exit 2)"."""
        return f"MAC cap ({self.how})" if self.how else "MAC cap"


def cost_bound(dyn: DynamicModel) -> CostBound:
    """The worst case per sample and the cap the model holds now (`CostBound`)."""
    worst = dyn.worst_case_macs()
    if isinstance(dyn, MacCapped):
        cap = int(dyn.mac_cap)
        return CostBound(worst, None if cap < 0 else cap, "", False)
    if isinstance(dyn, ExitCascade) and dyn.policy.kind != "patience":
        thresholds = dyn.thresholds.tolist()[: dyn.num_exits]
        forced = next((i for i, t in enumerate(thresholds) if t <= 0.0), None)
        if forced is not None:
            costs = dyn.forced_exit_macs() if isinstance(dyn, PerSampleExits) else dyn.exit_macs()
            return CostBound(worst, costs[forced], f"forced exit {forced}", False)
    return CostBound(worst, None, "", dyn.num_thresholds == 0)
