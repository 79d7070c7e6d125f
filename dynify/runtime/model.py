"""DynamicModel: what every strategy returns.

Whatever the strategy, a dynamic model (1) computes the original network exactly inside
`with dyn.static():`, (2) reports after each forward the MACs each sample really spent
(`last_macs`), next to the original network's (`static_macs`), and (3) carries the `spec` that
rebuilds it from an artifact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dynify.errors import InputError


@dataclass(frozen=True)
class JointRecipe:
    """How joint fine-tuning treats a strategy's new parts, which the strategy knows best.

    Exit heads learn well with the backbone's SGD at 10x its rate. Gates do not: a few hundred
    SGD steps barely move them, closed gates make the first losses large enough to blow up an
    unclipped backbone, and batch-norm statistics drift towards gated features (which would
    also change `dyn.static()`). So a strategy may ask for Adam on its new parts, a clipped
    backbone gradient and frozen batch-norm statistics.
    """

    new_parts: str = "sgd"  # "sgd": with the backbone at new_lr_scale x; "adam": at new_lr
    new_lr_scale: float = 10.0
    new_lr: float = 0.02
    clip_grad_norm: float | None = None
    freeze_batchnorm: bool = False


class _Recorded:
    """A per-forward record of a DynamicModel (`last_macs`, `last_exit`): a tensor, or None.

    A batch-1 forward records plain ints (`DynamicModel.record_one`) and the tensors are built
    when read: two one-element tensors cost ~20 us per forward, 2 % of a small network's early
    exit, and most forwards are never asked.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_{name}"

    def __get__(self, model: DynamicModel | None, owner: type) -> torch.Tensor | None:
        if model is None:
            return self  # type: ignore[return-value]
        model._unpack_one()
        return model.__dict__.get(self.key)

    def __set__(self, model: DynamicModel, value: torch.Tensor | None) -> None:
        model._unpack_one()
        model.__dict__[self.key] = value


class DynamicModel(nn.Module):
    """Base class of the networks the passes build."""

    strategy: ClassVar[str] = ""
    joint_recipe: ClassVar[JointRecipe] = JointRecipe()
    # State entries an older artifact may lack; they keep their initial values when loaded.
    optional_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, static_macs: int, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.static_macs = int(static_macs)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.spec: dict[str, Any] = {}
        self.last_macs = None
        self._static = False

    @property
    def is_static(self) -> bool:
        return self._static

    # What the last forward spent (`last_macs`) and, for strategies with exits, where each
    # sample left (`last_exit`); see `_Recorded`.
    last_macs = _Recorded()
    last_exit = _Recorded()

    def record_one(self, macs: int, exit_index: int | None, device: torch.device) -> None:
        """A batch-1 forward's `last_macs` (and `last_exit`, unless None), as Python ints."""
        self.__dict__["_last_one"] = (macs, exit_index, device)

    def _unpack_one(self) -> None:
        one = self.__dict__.pop("_last_one", None)
        if one is not None:
            macs, exit_index, device = one
            self.__dict__["_last_macs"] = torch.tensor([macs], dtype=torch.long, device=device)
            if exit_index is not None:
                self.__dict__["_last_exit"] = torch.tensor(
                    [exit_index], dtype=torch.long, device=device
                )

    @contextmanager
    def static(self) -> Iterator[DynamicModel]:
        """Within this block the model computes exactly the original network."""
        previous, self._static = self._static, True
        try:
            yield self
        finally:
            self._static = previous

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the cost accounting and the plan were not made for."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"Expected a tensor input, got {type(x).__name__}.")
        expected = (None, *self.input_shape)
        if x.dim() != len(expected) or tuple(x.shape[1:]) != self.input_shape:
            shape = "[B, " + ", ".join(str(d) for d in self.input_shape) + "]"
            raise InputError(
                f"Expected an input of shape {shape}, got {list(x.shape)}. The model was "
                f"converted for inputs of {shape}; resize the input, or convert again with "
                "--input-size (example_input= in the API) matching your data."
            )
        # The thresholds buffer follows the model's dtype and device through .to(), .half()...
        want = self.thresholds
        if x.dtype != want.dtype or x.device != want.device:
            raise InputError(
                f"Expected a {str(want.dtype).removeprefix('torch.')} input on {want.device}, "
                f"got {str(x.dtype).removeprefix('torch.')} on {x.device}. Convert the input "
                f"(x.to({want.device.type!r}, torch.{str(want.dtype).removeprefix('torch.')})): "
                "images as integers are scaled and normalised first, as in training."
            )

    def mean_macs_fraction(self) -> float:
        """Mean MACs of the last forward as a fraction of the static model's."""
        if self.last_macs is None:
            raise RuntimeError("No forward pass has run yet.")
        return float(self.last_macs.double().mean()) / self.static_macs
