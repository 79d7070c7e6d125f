"""The registry of strategies: one place to add one, one way to get one."""

from __future__ import annotations

from dynify.errors import StrategyError
from dynify.passes.base import ConversionContext, Strategy

_STRATEGIES: dict[str, type] = {}


def register_strategy(cls: type) -> type:
    """Class decorator: make a Strategy available under its `name`."""
    _STRATEGIES[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    _load_builtin_strategies()
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy registered under `name`, or an error listing the registered ones."""
    _load_builtin_strategies()
    if name not in _STRATEGIES:
        raise StrategyError(
            f"Unknown strategy '{name}'. Registered strategies: {', '.join(sorted(_STRATEGIES))}."
        )
    return _STRATEGIES[name]()


def sequence_strategies() -> list[str]:
    """The registered strategies whose models take a padded sequence and its lengths or mask
    (`forward(x, extra)`): their model class declares `takes_extra_input`
    (`dynify.runtime.model.DynamicModel`)."""
    _load_builtin_strategies()
    from dynify.runtime.model import DynamicModel

    found: set[str] = set()
    stack: list[type] = [DynamicModel]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "takes_extra_input", False) and getattr(cls, "strategy", ""):
            found.add(cls.strategy)
    return sorted(found & set(_STRATEGIES))


# Modules whose import registers a built-in strategy; a name not (yet) present is skipped.
_BUILTIN_MODULES = (
    "early_exit",
    "block_gates",
    "spatial_masks",
    "resolution",
    "dynamic_conv",
    "dynamic_width",
    "frame_exit",
    "skip_rnn",
    "stop_reading",
)


def _load_builtin_strategies() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"dynify.passes.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dynify.passes.{module}":
                raise


__all__ = [
    "ConversionContext",
    "Strategy",
    "get_strategy",
    "register_strategy",
    "sequence_strategies",
    "strategy_names",
]
