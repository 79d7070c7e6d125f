"""Model names to nn.Modules: torchvision, timm, dynify's built-ins and `pkg.mod:factory` paths.

One function, `build_model`, turns a name and a weights choice into a model plus a record of how
it was made (`ModelRef`), so a saved artifact can rebuild the same architecture later.

A name the user types may be an import path: the user chose to run that code. A name read from an
artifact is data from whoever sent the file, so `rebuild` takes only names from fixed lists (the
built-ins and torchvision's and timm's registries, never a hub download) and imports anything else
only when the caller named it in `trust_imports`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import pkgutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynify.errors import ModelError

BUILTINS = {
    "cifar_resnet20": "dynify.models.cifar_resnet:cifar_resnet20",
    "cifar_resnet32": "dynify.models.cifar_resnet:cifar_resnet32",
    "cifar_resnet44": "dynify.models.cifar_resnet:cifar_resnet44",
    "cifar_resnet56": "dynify.models.cifar_resnet:cifar_resnet56",
    "cifar_resnet110": "dynify.models.cifar_resnet:cifar_resnet110",
    "text_lstm": "dynify.models.text:text_lstm",
    "text_gru": "dynify.models.text:text_gru",
}
BUILTIN_INPUT_SIZE = 32  # the CIFAR ResNets' pixels; text models take token ids of any length
CONFIG_TYPES = (int, str, bool)
MAX_CONFIG_INT = 2**31
# A built-in rebuilt from an artifact's `config` is first built on the meta device and refused
# above this many parameters (16 GB of float32), so a crafted config cannot exhaust memory.
MAX_BUILTIN_PARAMETERS = 2**32


@dataclass
class ModelRef:
    """How a model was built: enough to rebuild the architecture (weights travel separately)."""

    kind: str  # "torchvision" | "timm" | "import" | "builtin" | "module"
    name: str
    num_classes: int | None = None
    input_size: int | None = None
    weights: str = "random"  # what the weights were when converted, for the record
    notes: list[str] = field(default_factory=list)
    # A built-in's architecture arguments (ints, strings, booleans), e.g. a text model's
    # vocab_size: checked against the factory's parameters before anything is built.
    config: dict[str, int | str | bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelRef:
        return cls(**data)


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models()


def resolve(name: str) -> ModelRef:
    """Decide which library a model name belongs to, or say which names are close."""
    if ":" in name and not name.startswith(("timm:", "torchvision:")):
        return ModelRef("import", name)
    for kind, names in (("timm", _timm_names), ("torchvision", _torchvision_names)):
        if name.startswith(f"{kind}:"):
            model, known = name.removeprefix(f"{kind}:"), names()
            # timm: "resnet50.a1_in1k" is an architecture and a pretrained tag
            architecture = model.partition(".")[0] if kind == "timm" else model
            if architecture not in known:  # never let a library look a name up on the network
                close = difflib.get_close_matches(model, known, n=5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ModelError(
                    f"Unknown {kind} model '{model}'.{hint} Use a name from {kind}'s own list "
                    "of models."
                )
            return ModelRef(kind, model)
    if name in BUILTINS:
        size = BUILTIN_INPUT_SIZE if name.startswith("cifar_") else None
        return ModelRef("builtin", name, input_size=size)
    tv_names = _torchvision_names()
    if name in tv_names:
        return ModelRef("torchvision", name)
    timm_names = _timm_names()
    if name in timm_names:
        return ModelRef("timm", name)
    close = difflib.get_close_matches(name, sorted({*BUILTINS, *tv_names, *timm_names}), n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelError(
        f"Unknown model '{name}'.{hint} Use a torchvision classification model name "
        "(torchvision.models.list_models()), a timm model name (timm.list_models()), a built-in "
        f"({', '.join(BUILTINS)}), or an import path 'package.module:factory'."
    )


def _import_factory(path: str):
    try:
        obj = pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelError(
            f"Cannot import '{path}': {exc}. The form is 'package.module:factory', where the "
            "package is importable from the current directory or the installed environment."
        ) from exc
    if not callable(obj):
        raise ModelError(f"'{path}' is not callable; it must name a class or a factory function.")
    return obj


def _instantiate(ref: ModelRef, num_classes: int | None, **kwargs) -> nn.Module:
    """The architecture, randomly initialised (weights come from elsewhere)."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if ref.kind == "torchvision":
        import torchvision.models as tvm

        return tvm.get_model(ref.name, weights=None, **kwargs)
    if ref.kind == "timm":
        import timm

        return timm.create_model(ref.name, pretrained=False, **kwargs)
    factory = _import_factory(BUILTINS[ref.name] if ref.kind == "builtin" else ref.name)
    if ref.config:
        check_config(ref)
        kwargs = {**ref.config, **kwargs}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"'{ref.name}' returned {type(model).__name__}, not an nn.Module.")
    return model


def check_config(ref: ModelRef) -> None:
    """Refuse a `config` that is not exactly arguments of the built-in's factory, of the types
    its defaults have, or that would build an absurdly large model (checked on the meta device:
    no memory is allocated)."""
    if not ref.config:
        return
    if ref.kind != "builtin" or ref.name not in BUILTINS:
        raise ModelError(
            f"Only dynify's built-in models take architecture arguments (config); "
            f"'{ref.name}' ({ref.kind}) was given {sorted(ref.config)}."
        )
    factory = _import_factory(BUILTINS[ref.name])
    parameters = {
        name: p
        for name, p in inspect.signature(factory).parameters.items()
        if name != "num_classes"
    }
    for key, value in ref.config.items():
        if key not in parameters:
            raise ModelError(
                f"'{ref.name}' has no argument '{key}'; its arguments are "
                f"{', '.join(parameters)} (and num_classes, set on its own)."
            )
        default = parameters[key].default
        want = type(default) if default is not inspect.Parameter.empty else int
        if type(value) is not want or (want is int and not 0 <= value <= MAX_CONFIG_INT):
            kind = "a whole number from 0 to 2^31" if want is int else f"a {want.__name__}"
            raise ModelError(f"'{ref.name}' argument '{key}' must be {kind}, got {value!r}.")
    required = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in ref.config]
    if missing:
        raise ModelError(f"'{ref.name}' needs the argument(s) {', '.join(missing)} in its config.")
    kwargs = dict(ref.config)
    if ref.num_classes is not None:
        kwargs["num_classes"] = ref.num_classes
    try:
        with torch.device("meta"):
            probe = factory(**kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"'{ref.name}' cannot be built from {ref.config}: {exc}") from exc
    count = sum(math.prod(p.shape) for p in probe.parameters())
    if count > MAX_BUILTIN_PARAMETERS:
        raise ModelError(
            f"'{ref.name}' with {ref.config} would have {count:,} parameters, more than the "
            f"{MAX_BUILTIN_PARAMETERS:,} dynify builds from a config; check its arguments."
        )


def ref_for_module(model: nn.Module) -> ModelRef:
    """How to rebuild a model the caller passed as an object: a model dynify's own built-ins
    made (a TextClassifier) is recorded as that built-in with its arguments, so its artifact
    rebuilds without trusting imports; any other as its class, which loading needs supplied."""
    from dynify.models.text import TextClassifier

    if isinstance(model, TextClassifier):
        return ModelRef(
            "builtin",
            f"text_{model.cell}",
            num_classes=model.num_classes,
            weights="given",
            config=model.builtin_config(),
        )
    cls = type(model)
    return ModelRef("module", f"{cls.__module__}:{cls.__qualname__}", weights="given")


def default_input_size(ref: ModelRef, model: nn.Module) -> int:
    """The input resolution a model expects: from its metadata where it has some."""
    if ref.input_size:
        return ref.input_size
    for attribute in ("image_size", "input_size"):  # torchvision ViT / MaxViT fix their size
        value = getattr(model, attribute, None)
        if isinstance(value, int):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return int(value[0])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return int(cfg["input_size"][-1])
    if ref.kind == "torchvision":
        weights = _torchvision_weights(ref.name)
        if weights is not None:
            crop = getattr(weights.transforms(), "crop_size", None)
            if crop:
                return int(crop[0])
    return 224


def _torchvision_weights(name: str):
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


# torchvision builders change the architecture when given weights (ViT's image size, Inception's
# input transform); rebuilding a pretrained model without downloading must do the same.
_TV_PRETRAINED_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


def _torchvision_pretrained_kwargs(name: str) -> dict:
    weights = _torchvision_weights(name)
    if name.startswith("vit_") and weights is not None:
        return {"image_size": weights.meta["min_size"][0]}
    if name.startswith("maxvit") and weights is not None:
        return {"input_size": weights.meta["min_size"]}
    return dict(_TV_PRETRAINED_KWARGS.get(name, {}))


def _pretrained_model(ref: ModelRef) -> nn.Module | None:
    """The library's pretrained model, from its cache or downloaded; None if it has none."""
    if ref.kind == "torchvision":
        import torchvision.models as tvm

        if _torchvision_weights(ref.name) is None:
            return None
        return tvm.get_model(ref.name, weights="DEFAULT")
    if ref.kind == "timm":
        import timm

        return timm.create_model(ref.name, pretrained=True)
    return None


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Weights file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"Cannot read weights file '{path}': {type(exc).__name__}: {exc}. It must be a "
            "state dict (or a checkpoint dict holding one) saved with torch.save, or a "
            ".safetensors file; pickled whole models are refused for safety."
        ) from exc
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"'{path}' does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, and on mismatch say which keys are missing or unexpected."""
    own = model.state_dict()
    # BN's num_batches_tracked is absent from checkpoints older than PyTorch 0.4.1; harmless.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches: {few(wrong_shape)}")
        raise ModelError(
            f"The weights in {source} do not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Check that the file belongs to this architecture (and --num-classes, if the "
            "classifier was retrained)."
        )
    model.load_state_dict(state, strict=False)


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Give a model built with its original classifier a fresh one for `num_classes` labels."""
    if hasattr(model, "reset_classifier"):  # timm models
        model.reset_classifier(num_classes)
        return
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last_name, last = name, module
    if last is None:
        raise ModelError("Cannot find a final nn.Linear or nn.Conv2d to replace for --num-classes.")
    if isinstance(last, nn.Linear):
        new = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    else:
        new = nn.Conv2d(last.in_channels, num_classes, last.kernel_size, last.stride)
    parent_name, _, child = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_model(
    name: str,
    *,
    weights: str | None = "auto",
    num_classes: int | None = None,
    config: dict[str, int | str | bool] | None = None,
) -> tuple[nn.Module, ModelRef]:
    """Build a named model in eval mode.

    `weights`: "auto" (the library's pretrained weights if cached or downloadable, else random
    init with a note saying so), "pretrained" (an error if they cannot be had), "random", or the
    path of a state-dict file. The returned ref's `notes` say what happened, for the user to see.
    `config`: a built-in's architecture arguments, e.g. `{"vocab_size": 20000}` for
    `text_lstm`; recorded in the ref, so an artifact rebuilds the same architecture.
    """
    ref = resolve(name)
    ref.num_classes = num_classes
    ref.config = dict(config or {})
    check_config(ref)
    weights = weights or "auto"
    if weights in ("auto", "pretrained"):
        try:
            model = _pretrained_model(ref)
        except Exception as exc:
            if weights == "pretrained":
                raise ModelError(
                    f"Cannot get pretrained weights for '{name}': {type(exc).__name__}: {exc}. "
                    "Without network access, pass --weights PATH with a local state dict, or "
                    "--weights random to convert with random initialisation."
                ) from exc
            model = None
            ref.notes.append(f"pretrained weights unavailable ({type(exc).__name__})")
        if model is None and weights == "pretrained":
            raise ModelError(
                f"'{name}' has no pretrained weights in its library. Pass --weights PATH or "
                "--weights random."
            )
        if model is not None:
            ref.weights = "pretrained"
            if num_classes is not None:
                replace_classifier(model, num_classes)
                ref.notes.append(f"fresh {num_classes}-class classifier on pretrained features")
        else:
            model = _instantiate(ref, num_classes)
            ref.weights = "random"
            ref.notes.append(
                "RANDOM weights: no pretrained weights could be loaded; pass --weights PATH "
                "for trained ones, or --weights random to make this choice explicit"
            )
    elif weights == "random":
        model = _instantiate(ref, num_classes)
        ref.weights = "random"
        ref.notes.append("random weights, as asked")
    else:
        model = _instantiate(ref, num_classes)
        load_weights(model, load_state_file(weights), f"'{weights}'")
        ref.weights = str(weights)
    if ref.kind != "builtin" or ref.input_size:  # text built-ins take ids of any length
        ref.input_size = default_input_size(ref, model)
    return model.eval(), ref


def _timm_registered(name: str) -> bool:
    """A name in timm's own registry: no `hf-hub:`/`local-dir:` prefix, which would fetch code
    or configuration from elsewhere."""
    try:
        import timm
        from timm.models import parse_model_name
    except ImportError:
        return False
    try:
        prefix, _ = parse_model_name(name)
    except ValueError:  # an unknown source prefix
        return False
    return prefix is None and timm.is_model(name)


def check_rebuildable(ref: ModelRef, trust_imports: Sequence[str] = ()) -> None:
    """Refuse a saved reference that rebuilding would have to import without the caller's consent.

    Built-ins, torchvision and timm names are looked up in fixed registries; an import path or a
    Python class is imported only when `trust_imports` names it exactly.
    """
    if ref.kind == "builtin" and ref.name in BUILTINS:
        check_config(ref)
        return
    if ref.config:
        check_config(ref)  # refuses: only built-ins take a config
    if ref.kind == "torchvision" and ref.name in _torchvision_names():
        return
    if ref.kind == "timm" and _timm_registered(ref.name):
        return
    if ref.kind in ("import", "module"):
        if ref.name in trust_imports:
            return
        what = "model factory" if ref.kind == "import" else "Python class"
        raise ModelError(
            f"This artifact rebuilds its model from the {what} '{ref.name}', and loading an "
            "artifact never imports code it names unless you trust it. Either pass the "
            "architecture, e.g. dynify.load(path, model=MyNet()), or, if you trust that code, "
            f"name it: dynify.load(path, trust_imports=[{ref.name!r}]) (CLI: --trust-import "
            f"{ref.name})."
        )
    raise ModelError(
        f"This artifact names the {ref.kind} model '{ref.name}', which is not in dynify's "
        f"built-ins ({', '.join(BUILTINS)}), torchvision's or timm's registry, so it cannot be "
        "rebuilt by name (hub models are never fetched at load). Pass the architecture: "
        "dynify.load(path, model=MyNet())."
    )


def rebuild(ref: ModelRef, trust_imports: Sequence[str] = ()) -> nn.Module:
    """The architecture of a saved ref, randomly initialised (an artifact supplies the weights).

    Only registry names are rebuilt by name; see `check_rebuildable` for import paths.
    """
    check_rebuildable(ref, trust_imports)
    if ref.kind == "module":
        try:
            model = _import_factory(ref.name)()
        except TypeError as exc:
            raise ModelError(
                f"'{ref.name}' cannot be built without arguments ({exc}). Pass the "
                "architecture instead: dynify.load(path, model=MyNet(...))."
            ) from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"'{ref.name}' returned {type(model).__name__}, not an nn.Module.")
    elif ref.weights == "pretrained":
        if ref.kind == "timm":
            model = _instantiate(ref, None)
        else:
            model = _instantiate(ref, None, **_torchvision_pretrained_kwargs(ref.name))
        if _num_outputs_differ(model, ref.num_classes):
            replace_classifier(model, ref.num_classes)
    else:
        model = _instantiate(ref, ref.num_classes)
    return model.eval()


def _num_outputs_differ(model: nn.Module, num_classes: int | None) -> bool:
    if num_classes is None:
        return False
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not last:
        return False
    out = last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels
    return out != num_classes
