"""The cost ledger: what a dynamic model's parts cost (the book) and what each sample of one
forward really spent (the tab), kept once for every strategy.

The *book* is built by the pass, at build time, from the MACs the front end wrote on
`node.meta` (`dynify.frontend.cost`: FlopCounterMode's counts, never a hand count). It names
each cost item and its role:
- `FIXED`: work every sample does whatever it decides (the layers no decision touches);
- `DECIDER`: a decision unit's own cost (a gate, a halting unit, a mask unit, a policy
  network): paid by a sample that decides there, and charged in full by the floor;
- `UNIT`: skippable work (a gated branch, a mask's tiles, a segment after an exit), paid only
  by the samples that run it; `dearest` is the most running it can cost (a region mask's
  halo'd tiles can cost more than the dense branch), `macs` what running it whole costs.
From the book alone: `worst_case_macs()` (every decision taken the dearest way), `floor()`
(every unit skipped, every decision unit charged: the cheapest a sample can spend and the
least MAC cap, `dynify.runtime.mac_cap`), the exit costs of a cascade (`cumulative`) and the
MAC columns of `describe()` rows (`columns`).

The *tab* is opened by the model at the start of a forward (`DynamicModel.open_tab`), handed
to its wrappers with the rest of the pass's state (so it is per thread as that state is), and
charged by them: `tab.charge(item, ran)`, where `ran` says which samples did the work (every
sample, a bool mask [B], row indices, a float weight [B] for straight-through training, or a
Python bool at batch 1). `DynamicModel.close_tab` turns it into `last_macs`.

The book is plain data (no tensors, not in the state dict): loading an artifact rebuilds it
from the stored plan, so artifacts written before it existed load unchanged; `to_dict` /
`from_dict` give its JSON form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from dynify.errors import StrategyError

FIXED = "fixed"
DECIDER = "decider"
UNIT = "unit"
ROLES = (FIXED, DECIDER, UNIT)


@dataclass(frozen=True)
class CostItem:
    """One named cost of a model, per sample: `macs` to run it, at most `dearest`."""

    name: str
    macs: int
    role: str
    dearest: int


def mega(macs: int, digits: int = 1) -> str:
    """MACs as a table shows them: millions, `digits` decimals."""
    return f"{macs / 1e6:.{digits}f} M"


class CostBook:
    """The named cost items of one model (see the module docstring), in the order added."""

    def __init__(self, static_macs: int, items: Iterable[CostItem] = ()):
        self.static_macs = int(static_macs)
        self.items: dict[str, CostItem] = {}
        for item in items:
            self.add(item.name, item.macs, item.role, item.dearest)

    def add(self, name: str, macs: int, role: str = UNIT, dearest: int | None = None) -> str:
        """Enter an item; returns its name (what wrappers charge). `dearest` defaults to `macs`."""
        if role not in ROLES:
            raise StrategyError(f"Unknown cost role '{role}'; one of {ROLES}.")
        if name in self.items:
            raise StrategyError(f"The cost book already has an item '{name}'.")
        macs = int(macs)
        dearest = macs if dearest is None else int(dearest)
        if macs < 0 or dearest < macs:
            raise StrategyError(
                f"Cost item '{name}': MACs must be >= 0 and its dearest cost >= its MACs, "
                f"got {macs} and {dearest}."
            )
        self.items[name] = CostItem(name, macs, role, dearest)
        return name

    def macs(self, name: str) -> int:
        """What running item `name` whole costs one sample."""
        return self.items[name].macs

    def total(self, names: Iterable[str]) -> int:
        return sum(self.items[n].macs for n in names)

    def names(self, role: str) -> list[str]:
        return [n for n, item in self.items.items() if item.role == role]

    def fixed_macs(self) -> int:
        """What every sample spends whatever it decides, decision units left out."""
        return self.total(self.names(FIXED))

    def floor(self) -> int:
        """Every skippable unit skipped and every decision unit charged: the least a sample
        spends, and the least MAC cap there can be (`dynify.runtime.mac_cap`)."""
        return self.fixed_macs() + self.total(self.names(DECIDER))

    def worst_case_macs(self) -> int:
        """Every decision taken the dearest way: every decision unit run, every skippable unit
        at its dearest. No sample's `last_macs` exceeds it."""
        return sum(item.dearest for item in self.items.values())

    def cumulative(self, stages: Sequence[Sequence[str]]) -> list[int]:
        """A cascade's exit costs: entry i is what a sample that stops after stage i spent
        (every item of stages 0..i)."""
        spent, result = 0, []
        for stage in stages:
            spent += self.total(stage)
            result.append(spent)
        return result

    def columns(
        self,
        macs: int,
        label: str = "MACs",
        digits: int = 1,
        share: str = "of static",
        share_digits: int = 3,
    ) -> dict[str, str]:
        """The MAC columns of a `describe()` row: `macs` in millions and as a share of the
        static network's."""
        return {label: mega(macs, digits), share: self.share(macs, share_digits)}

    def share(self, macs: int, digits: int = 3) -> str:
        """`macs` as a share of the static network's, as a table shows it."""
        return f"{macs / self.static_macs:.{digits}f}"

    def tab(
        self,
        batch: int,
        device: torch.device | str = "cpu",
        *,
        scalar: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> Tab:
        """A fresh tab for one forward of `batch` samples (`scalar`: batch 1 in Python floats)."""
        return Tab(self, batch, device, scalar=scalar, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"static_macs": self.static_macs, "items": [asdict(i) for i in self.items.values()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostBook:
        return cls(data["static_macs"], (CostItem(**item) for item in data["items"]))

    def __repr__(self) -> str:
        return (
            f"CostBook({len(self.items)} items, floor {self.floor():,}, "
            f"worst case {self.worst_case_macs():,} of static {self.static_macs:,} MACs)"
        )


class Tab:
    """What each sample of one forward spent: float64 [B] (a Python float with `scalar`),
    starting at the book's fixed cost; wrappers `charge` it as they run.

    Charges are exact: float64 holds every integer MAC count below 2^53. `dtype` float32 and
    float `ran` weights make the tab differentiable (straight-through training decisions).
    """

    __slots__ = ("book", "scalar", "spent")

    def __init__(
        self,
        book: CostBook,
        batch: int,
        device: torch.device | str = "cpu",
        *,
        scalar: bool = False,
        dtype: torch.dtype = torch.float64,
    ):
        self.book = book
        self.scalar = scalar
        fixed = float(book.fixed_macs())
        if scalar:
            self.spent: Tensor | float = fixed
        else:
            self.spent = torch.full((batch,), fixed, dtype=torch.float64, device=device)
            if dtype != torch.float64:
                self.spent = self.spent.to(dtype)

    def charge(self, item: str, ran: Tensor | bool | None = None) -> None:
        """Charge item `item`'s MACs to the samples that ran it: `ran` None (every sample), a
        Python bool (a scalar tab), a bool mask [B], or float weights [B] (differentiable:
        training's straight-through decisions)."""
        macs = self.book.items[item].macs
        if self.scalar:
            if ran is None or ran:
                self.spent += macs
        elif ran is None:
            self.spent = self.spent + macs
        elif ran.dtype == torch.bool or ran.is_floating_point():
            self.spent = self.spent + ran.to(self.spent.dtype) * macs
        else:
            raise StrategyError(
                f"Charge '{item}' with a bool mask or float weights, got {ran.dtype}; row "
                "indices go through charge_rows."
            )

    def charge_rows(self, item: str, rows: Tensor) -> None:
        """Charge item `item`'s MACs to the samples at `rows` (int64 indices into the batch:
        the samples a narrowed batch still runs)."""
        macs = float(self.book.items[item].macs)
        cost = torch.full(rows.shape, macs, dtype=self.spent.dtype, device=self.spent.device)
        self.spent = self.spent.index_add(0, rows, cost)

    def charge_amount(self, item: str, amount: Tensor | float) -> None:
        """Charge each sample `amount` [B] MACs of item `item` (the part of a unit it ran: a
        mask's active tiles or positions; a Python number on a scalar tab); never more than
        the item's dearest cost."""
        if item not in self.book.items:
            raise StrategyError(f"The cost book has no item '{item}' to charge.")
        if self.scalar:
            self.spent += float(amount)
            return
        self.spent = self.spent + amount.to(self.spent.device, self.spent.dtype)

    def macs(self) -> Tensor:
        """int64 [B]: the MACs each sample spent (rounded: a float32 tab is inexact)."""
        if self.scalar:
            return torch.tensor([round(self.spent)], dtype=torch.long)
        return self.spent.detach().round().long()
