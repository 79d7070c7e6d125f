"""The strategy contract, checked on every registered strategy and every variant it declares.

A strategy enrols by registering (`dynify.passes.register_strategy`) and declaring its
`variants` (the options that change how it decides: gate kinds, exit policies, mask
granularities). Each variant of each strategy, converted once from a tiny network, must:
1. compute the original network bit-exactly inside `static()`, for a batch and for one sample;
2. give a batch exactly what its samples get alone (outputs, decisions, `last_macs`) at
   thresholds under which the batch's samples decide differently;
3. report in `last_macs` the MACs `FlopCounterMode` counts for the work that really ran;
4. survive `dynify.save` / `dynify.load` with identical outputs, thresholds and decisions;
5. have an export face (`forward(x, thresholds) -> (logits, decisions)`) that decides like
   the model at thresholds forcing each behaviour, and export to ONNX (`dynify.export_onnx`,
   verified) matching eager in ONNX Runtime there: logits within 1e-4, the same decisions
   (the ONNX half is marked slow: an export takes tens of seconds);
6. convert through the CLI.

Every contract operation goes through the adapters below, so a renamed contract method is a
one-line change here.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynify
from dynify.passes import get_strategy
from tests.conftest import randomize_bn

# --- adapters: the contract's operations, in one place ----------------------------------


def face(dyn: dynify.DynamicModel) -> nn.Module:
    """The export face: `forward(x, thresholds) -> (logits, decisions)`."""
    return dyn.export_face().eval()


def set_all_thresholds(dyn: dynify.DynamicModel, thresholds: float | Sequence[float]) -> None:
    dyn.set_thresholds(thresholds)


def thresholds_of(dyn: dynify.DynamicModel) -> list[float]:
    return dyn.thresholds.tolist()


def decisions_of(dyn: dynify.DynamicModel) -> Tensor:
    """What each sample of the last forward decided, int64, in the form the export face
    returns it (exit index [N], executed gates [N, K], active units [N, K], ...)."""
    return dyn.last_decisions()


def onnx_output_names(dyn: dynify.DynamicModel) -> tuple[str, str]:
    """The ONNX graph's (logits, decisions) output names: the same for every strategy."""
    from dynify.runtime.model import OUTPUT_NAMES

    return OUTPUT_NAMES


def forcing_thresholds(dyn: dynify.DynamicModel) -> list[tuple[str, list[float]]]:
    """Named thresholds that pin the model to each behaviour (every exit; none..all run)."""
    from dynify.export.bench import threshold_cases

    return threshold_cases(dyn)


def variants(strategy: str) -> tuple[dict[str, Any], ...]:
    return type(get_strategy(strategy)).variants


def more_examples(strategy: str) -> dict[str, tuple[dict[str, Any], ...]]:
    """Further example networks a strategy runs the contract on, each with its variants
    (`contract_examples`: the temporal strategies on texts passed with lengths or a mask)."""
    return dict(getattr(type(get_strategy(strategy)), "contract_examples", {}))


def call(module: nn.Module, x: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The original network on an example's inputs: one tensor, or (ids, lengths) passed
    positionally as its forward takes them."""
    return module(*x) if isinstance(x, tuple) else module(x)


def onnx_inputs(dyn: dynify.DynamicModel) -> list[str]:
    """The ONNX graph's input names: x, the lengths or mask of a model converted with them,
    thresholds."""
    extra = [] if dyn.extra_input is None else [dyn.extra_input.name]
    return ["x", *extra, "thresholds"]


def onnx_feed(
    dyn: dynify.DynamicModel, x: Tensor | tuple[Tensor, ...], thresholds: Sequence[float]
) -> dict[str, np.ndarray]:
    tensors = tuple(iter(x)) if isinstance(x, tuple) else (x,)
    feed = {name: t.numpy() for name, t in zip(onnx_inputs(dyn), tensors, strict=False)}
    return {**feed, "thresholds": np.asarray(thresholds, np.float32)}


# --- the tiny network every strategy applies to ------------------------------------------

INPUT = (3, 24, 24)  # 24 -> 3x3 tiles of 8 in the first stage, 12 -> 2x2 tiles of 6 after
BATCH = 8


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn (a ResNet basic block's branch): a spatial mask's halo of 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class ContractNet(nn.Module):
    """Stem, a stage of two identity blocks, a stage of a projection block and an identity
    block, pooled linear head: it has cut points (early exits), residual blocks in stages
    (gates, halting), stride-1 blocks (spatial masks) and a fully convolutional body
    (resolution)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b0, self.b1 = BasicBlock(8), BasicBlock(8)
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.b3 = BasicBlock(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b0(x))
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.down(x) + self.b2(x))
        x = torch.relu(x + self.b3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODEL_PATH = f"{__name__}:ContractNet"


def contract_model() -> nn.Module:
    """Seeded, with batch-norm statistics and confident logits, as a trained network has."""
    torch.manual_seed(0)
    model = randomize_bn(ContractNet())
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    return model


def contract_input(batch: int = BATCH) -> Tensor:
    """Samples of very different contrast, so they decide differently."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.exp(torch.randn(batch, 1, 1, 1, generator=generator))
    return torch.randn(batch, *INPUT, generator=generator) * scale


class TokenNet(nn.Module):
    """A tiny text classifier on token ids [N, T]: embedding, a 1-layer LSTM, the output at
    each text's last non-pad token (pad id 0), linear. What temporal strategies apply to."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        from dynify.models.text import TextClassifier

        self.net = TextClassifier(40, num_classes, embed_dim=8, hidden=12, dropout=0.0)

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)


TOKENS = 12


def token_model() -> nn.Module:
    torch.manual_seed(0)
    model = TokenNet().eval()
    with torch.no_grad():
        model.net.classifier.weight.mul_(10.0)
    return model


def token_input(batch: int = BATCH) -> Tensor:
    """Token ids, some rows padded at the end (pad id 0), so texts have different lengths."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (batch, TOKENS), generator=generator)
    for row in range(1, batch, 3):
        ids[row, TOKENS - row % TOKENS :] = 0
    return ids


class ClipNet(nn.Module):
    """A TSN-style clip model on [N, T, 3, H, W]: frames folded into the batch, a per-frame
    conv net, [N, T, K] logits averaged over time. What frame-exit applies to."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.frame = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, num_classes),
        )

    def forward(self, clip: Tensor) -> Tensor:
        logits = self.frame(clip.flatten(0, 1))
        return logits.unflatten(0, (clip.shape[0], clip.shape[1])).mean(1)


CLIP = (4, 3, 16, 16)


def clip_model() -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(ClipNet())
    with torch.no_grad():
        model.frame[-1].weight.mul_(10.0)
    return model


def clip_input(batch: int = BATCH) -> Tensor:
    """Clips of very different contrast, so they decide differently."""
    generator = torch.Generator().manual_seed(1)
    scale = torch.exp(torch.randn(batch, 1, 1, 1, 1, generator=generator))
    return torch.randn(batch, *CLIP, generator=generator) * scale


def hostile_floats(x: Tensor) -> Tensor:
    """NaN, a huge finite value and inf in some samples: what an attacker sends."""
    hostile = x.clone()
    hostile[0].view(-1)[0], hostile[1] = float("nan"), 3e38
    hostile[2].view(-1)[:8] = float("inf")
    return hostile


def hostile_ids(x: Tensor) -> Tensor:
    """The extreme token ids (pad everywhere, the last id everywhere): ids cannot be NaN."""
    hostile = x.clone()
    hostile[0], hostile[1] = 0, 39
    return hostile


class Padded(tuple):
    """A padded batch and its lengths or mask, `(ids, extra)`, that slices along the batch like
    one tensor (`x[:1]`, `x[i : i + 1]`, `len(x)`: the batch) so every contract test runs on it
    unchanged; a converted model takes it as it is (`dyn(x)`), the original through `call`."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return Padded(t[key] for t in iter(self))
        return tuple.__getitem__(self, key)

    def __len__(self) -> int:
        return len(tuple.__getitem__(self, 0))


class TokenLengthsNet(nn.Module):
    """TokenNet called with each text's length, `forward(ids, lengths)`: the output at
    `lengths - 1` (no packing)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        from dynify.models.text import LengthsTextClassifier

        self.net = LengthsTextClassifier(40, num_classes, embed_dim=8, hidden=12, dropout=0.0)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        return self.net(ids, lengths)


class TokenMaskNet(nn.Module):
    """TokenNet called with a padding mask, `forward(ids, mask)`: the mean of the outputs over
    the real tokens."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        from dynify.models.text import MaskedTextClassifier

        self.net = MaskedTextClassifier(40, num_classes, embed_dim=8, hidden=12, dropout=0.0)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.net(ids, mask)


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        model.net.classifier.weight.mul_(10.0)
    return model


def text_lengths(ids: Tensor) -> Tensor:
    """Each row's length: up to its last non-pad token (at least 1)."""
    real = torch.arange(1, ids.shape[1] + 1) * (ids != 0)
    return real.amax(1).clamp(min=1)


def lengths_input(batch: int = BATCH) -> Padded:
    """token_input's ids with their lengths (int64 [N])."""
    ids = token_input(batch)
    return Padded((ids, text_lengths(ids)))


def mask_input(batch: int = BATCH) -> Padded:
    """token_input's ids with their padding mask (bool [N, T])."""
    ids = token_input(batch)
    steps = torch.arange(TOKENS)[None, :]
    return Padded((ids, steps < text_lengths(ids)[:, None]))


def hostile_padded(x: Padded) -> Padded:
    """Extreme ids at the shortest and the longest lengths."""
    ids, extra = tuple(iter(x))
    ids = hostile_ids(ids)
    extra = extra.clone()
    if extra.dim() == 1:
        extra[0], extra[1] = 1, TOKENS
    else:
        extra[0], extra[1] = False, True
        extra[0, 0] = True
    return Padded((ids, extra))


@dataclass(frozen=True)
class Example:
    """A tiny network of one kind, its inputs, and how the CLI describes them. A strategy
    names the kind it applies to in its `contract_example` class attribute ("image" if
    absent)."""

    model: Callable[[], nn.Module]
    inputs: Callable[..., Any]  # a tensor, or a `Padded` (ids, lengths / mask)
    model_class: type[nn.Module]
    cli_input: tuple[str, ...]
    hostile: Callable[[Tensor], Tensor]


EXAMPLES = {
    "image": Example(
        contract_model,
        contract_input,
        ContractNet,
        ("--input-size", str(INPUT[-1])),
        hostile_floats,
    ),
    "tokens": Example(
        token_model,
        token_input,
        TokenNet,
        ("--input-shape", f"1,{TOKENS}", "--input-dtype", "int64"),
        hostile_ids,
    ),
    "clip": Example(
        clip_model,
        clip_input,
        ClipNet,
        ("--input-shape", ",".join(map(str, (1, *CLIP)))),
        hostile_floats,
    ),
    "tokens+lengths": Example(
        functools.partial(_seeded, TokenLengthsNet),
        lengths_input,
        TokenLengthsNet,
        ("--input-shape", f"1,{TOKENS}", "--input-dtype", "int64", "--lengths"),
        hostile_padded,
    ),
    "tokens+mask": Example(
        functools.partial(_seeded, TokenMaskNet),
        mask_input,
        TokenMaskNet,
        ("--input-shape", f"1,{TOKENS}", "--input-dtype", "int64", "--mask"),
        hostile_padded,
    ),
}


EXAMPLE_KEY = "__example__"  # in a variant's options: the further example it runs on


def example_of(strategy: str, options: dict[str, Any] | None = None) -> Example:
    if options and EXAMPLE_KEY in options:
        return EXAMPLES[options[EXAMPLE_KEY]]
    return EXAMPLES[getattr(type(get_strategy(strategy)), "contract_example", "image")]


def strategy_options(options: dict[str, Any]) -> dict[str, Any]:
    """A variant's options without the example it runs on."""
    return {k: v for k, v in options.items() if k != EXAMPLE_KEY}


# --- one converted model per (strategy, variant) -----------------------------------------


@dataclass
class Case:
    example: Example
    model: nn.Module  # the original network
    dyn: dynify.DynamicModel
    x: Tensor
    mixed: list[float]  # thresholds under which the samples of `x` decide differently


def _fingerprint(tensor: Tensor) -> tuple[tuple[int, ...], bytes]:
    """Shape and sorted values: a tensor the strategy only rearranged (dynamic width permutes
    a branch's inner channels) is still the original's, not a part the strategy added."""
    return tuple(tensor.shape), np.sort(tensor.detach().numpy(), axis=None).tobytes()


def spread_new_parts(dyn: dynify.DynamicModel, model: nn.Module) -> None:
    """Random, input-dependent weights on the parts the strategy added (a fresh exit head
    predicts the uniform distribution, a fresh gate is open for every sample): a model whose
    decisions ignore its input would pass the batch and MAC tests without deciding anything."""
    original = {_fingerprint(t) for t in (*model.parameters(), *model.buffers())}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in dyn.named_parameters():
            if _fingerprint(p) in original:
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * 3.0 / fan_in**0.5)
            elif name.endswith("bias"):
                p.zero_()


def distinct(decisions: Tensor | np.ndarray) -> int:
    """How many different decisions (rows) the samples took."""
    return len({tuple(np.asarray(row).reshape(-1).tolist()) for row in decisions})


CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def mixing_thresholds(dyn: dynify.DynamicModel, x: Tensor) -> list[float]:
    """Thresholds from a grid (one value for all, then one coordinate at a time) under which
    the batch's samples take the most different decisions: not all exit, not none."""
    k = len(thresholds_of(dyn))
    trials = [[t] * k for t in CANDIDATES]
    best, most = trials[0], 0
    with torch.no_grad():
        for i in range(-1, k):
            if i >= 0:
                trials = [[*best[:i], t, *best[i + 1 :]] for t in CANDIDATES]
            for trial in trials:
                set_all_thresholds(dyn, trial)
                dyn(x)
                if distinct(decisions_of(dyn)) > most:
                    best, most = trial, distinct(decisions_of(dyn))
    return best


@functools.cache
def converted(strategy: str, options_json: str) -> Case:
    options = json.loads(options_json)
    example = example_of(strategy, options)
    model, x = example.model(), example.inputs()
    dyn = dynify.convert(model, strategy, x[:1], options=strategy_options(options)).eval()
    spread_new_parts(dyn, model)
    return Case(example, model, dyn, x, mixing_thresholds(dyn, x))


def case_id(strategy: str, options: dict[str, Any]) -> str:
    """The strategy and its options' values; a number named by its option ("every4",
    "jump1", "group2"), which alone would not say what it counts."""
    values = (v if isinstance(v, str) else f"{k}{v}" for k, v in options.items())
    return "-".join([strategy, *values])


def variant_params(
    known_failures: dict[str, str] | None = None, *marks: pytest.MarkDecorator
) -> list[Any]:
    """One pytest param per (strategy, variant), with `marks`; a case named in
    `known_failures` (by case id, with the reason) is a strict xfail: it fails today, and
    passes the day the bug is fixed, when the entry must go."""
    known_failures = dict(known_failures or {})
    params = []
    for strategy in dynify.strategy_names():
        more = [
            {**options, EXAMPLE_KEY: name}
            for name, options_list in more_examples(strategy).items()
            for options in options_list
        ]
        for options in [*variants(strategy), *more]:
            cid = case_id(strategy, options)
            case_marks = list(marks)
            if cid in known_failures:
                reason = known_failures.pop(cid)
                case_marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(pytest.param(strategy, options, id=cid, marks=case_marks))
    assert not known_failures, f"known failures of no registered case: {known_failures}"
    return params


@pytest.fixture
def case(strategy: str, options: dict[str, Any]) -> Case:
    case = converted(strategy, json.dumps(options, sort_keys=True))
    set_all_thresholds(case.dyn, case.mixed)
    return case


@contextmanager
def thresholds_at(dyn: dynify.DynamicModel, values: Sequence[float]) -> Iterator[None]:
    saved = thresholds_of(dyn)
    set_all_thresholds(dyn, values)
    try:
        yield
    finally:
        set_all_thresholds(dyn, saved)


def flop_counted_macs(module: nn.Module, x: Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


# --- 1. static mode ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,options", variant_params())
def test_static_mode_is_the_original_network_exactly(case):
    """Bit-exact (same dtype, torch.equal) for a batch and for one sample, at the full static
    cost per sample; whatever the thresholds are."""
    dyn, x = case.dyn, case.x
    with torch.no_grad():
        for xb in (x, x[:1]):
            expected = call(case.model, xb)
            with dyn.static():
                got = dyn(xb)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)
            assert dyn.last_macs.tolist() == [dyn.static_macs] * len(xb)


# --- 2. a batch equals its samples alone ---------------------------------------------------


BATCH_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize("strategy,options", variant_params(BATCH_FAILURES))
def test_a_batch_equals_its_samples_run_alone(case):
    dyn, x = case.dyn, case.x
    with torch.no_grad():
        batch_out = dyn(x)
        batch_decisions, batch_macs = decisions_of(dyn).clone(), dyn.last_macs.clone()
        alone, alone_decisions, alone_macs = [], [], []
        for i in range(len(x)):
            alone.append(dyn(x[i : i + 1]))
            alone_decisions.append(decisions_of(dyn))
            alone_macs.append(dyn.last_macs)
    assert distinct(batch_decisions) >= 2, "the samples should decide differently"
    assert torch.equal(batch_decisions, torch.cat(alone_decisions))
    assert torch.equal(batch_macs, torch.cat(alone_macs))
    assert (batch_out - torch.cat(alone)).abs().max() <= 1e-5


# --- 3. last_macs is what ran --------------------------------------------------------------


@pytest.mark.parametrize("strategy,options", variant_params())
def test_last_macs_of_each_sample_is_what_flop_counter_counts(case):
    """Each sample alone, at the mixed thresholds: `last_macs` == FlopCounterMode's MACs."""
    dyn, x = case.dyn, case.x
    counted, booked = [], []
    for i in range(len(x)):
        counted.append(flop_counted_macs(dyn, x[i : i + 1]))
        booked.append(int(dyn.last_macs[0]))
    assert booked == counted


@pytest.mark.parametrize("strategy,options", variant_params())
def test_last_macs_of_a_batch_is_what_flop_counter_counts(case):
    """A whole batch, at the mixed and at every forcing thresholds: the MACs FlopCounterMode
    counts are the sum of `last_macs` (the batch really ran only what its samples needed),
    and in static mode the static network's."""
    dyn, x = case.dyn, case.x
    for label, thresholds in [("mixed", case.mixed), *forcing_thresholds(dyn)]:
        with thresholds_at(dyn, thresholds):
            counted = flop_counted_macs(dyn, x)
        assert counted == int(dyn.last_macs.sum()), label
    with dyn.static():
        assert flop_counted_macs(dyn, x) == len(x) * dyn.static_macs


@pytest.mark.parametrize("strategy,options", variant_params())
def test_static_mode_and_records_are_per_thread(case):
    """One model, three threads at once: one inside `static()`, one dynamic on the batch, one
    dynamic on one sample. Every call's output, `last_macs` and decisions equal what the same
    call gives in a single thread: no thread's mode, pass or records leak into another's."""
    import sys
    import threading

    dyn, x = case.dyn, case.x
    with torch.no_grad():
        expected = {}
        for name, xb in (("batch", x), ("one", x[:1])):
            expected[name] = (dyn(xb), dyn.last_macs.clone(), decisions_of(dyn).clone())
        with dyn.static():
            expected["static"] = (dyn(x), dyn.last_macs.clone(), None)
    assert not torch.equal(expected["batch"][1], expected["static"][1])
    inputs = {"batch": x, "one": x[:1], "static": x}
    errors: list[str] = []
    start = threading.Barrier(3)

    def run(name: str) -> None:
        out, macs, decisions = expected[name]
        start.wait()
        with torch.no_grad(), dyn.static() if name == "static" else contextlib.nullcontext():
            for i in range(40):
                got = dyn(inputs[name])
                if not torch.equal(got, out):
                    errors.append(f"{name} call {i}: another thread's output")
                if not torch.equal(dyn.last_macs, macs):
                    errors.append(f"{name} call {i}: another call's last_macs")
                if decisions is not None and not torch.equal(decisions_of(dyn), decisions):
                    errors.append(f"{name} call {i}: another call's decisions")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=run, args=(name,)) for name in expected]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [], errors[:5]
    assert not dyn.is_static


# Where the forcing thresholds make a sample pay the worst case itself. Region masks' worst
# case (every tile but one, overlapping halos) is bounded here and reached by fixed masks below.
# stop-reading's jump variants: reading every token also needs the jump threshold above 1 (a
# value of its own, not an exit threshold the forcing thresholds set).
WORST_CASE_NOT_FORCED = {
    "spatial-masks-region",
    "block-gates-halting",
    "stop-reading-every2-confidence-jump1",
    "stop-reading-every2-patience-jump2",
    "stop-reading-every2-confidence-jump1-tokens+lengths",
}


@pytest.mark.parametrize("strategy,options", variant_params())
def test_no_sample_spends_more_than_the_worst_case(case, strategy, options):
    """`last_macs <= worst_case_macs()` for every sample at the mixed and every forcing
    thresholds, on ordinary, huge and non-finite inputs; at least the static network's; and
    reached by some forcing thresholds where a threshold can make a sample pay it."""
    dyn, x = case.dyn, case.x
    worst = dyn.worst_case_macs()
    assert worst >= dyn.static_macs
    hostile = case.example.hostile(x)
    spent = []
    for label, thresholds in [("mixed", case.mixed), *forcing_thresholds(dyn), ("1.0", 1.0)]:
        with torch.no_grad(), thresholds_at(dyn, thresholds):
            for xb in (x, x[:1], hostile):
                dyn(xb)
                assert int(dyn.last_macs.max()) <= worst, (label, len(xb))
                spent.append(int(dyn.last_macs.max()))
    if case_id(strategy, options) not in WORST_CASE_NOT_FORCED:
        assert max(spent) == worst
    assert f"{worst / 1e6:.1f} M MACs" in flat_summary(dyn)


def test_region_masks_worst_case_is_every_tile_but_one():
    """Region tiles with their halos cost more than the dense branch when all but one run."""
    dyn = converted("spatial-masks", json.dumps({"granularity": "region"})).dyn
    x = contract_input()[:1]
    masks = []
    for wrapper in dyn.wrappers:
        h, w = wrapper.units()
        mask = torch.ones(1, h, w, dtype=torch.bool)
        mask[0, 0, 0] = False
        masks.append(mask)
    dyn.set_fixed_masks(masks)
    try:
        with torch.no_grad():
            dyn(x)
    finally:
        dyn.set_fixed_masks(None)
    forced_mask_units = sum(w.mask_macs for w in dyn.wrappers)  # a fixed mask costs no unit
    assert int(dyn.last_macs[0]) + forced_mask_units == dyn.worst_case_macs() > dyn.static_macs


def flat_summary(dyn: dynify.DynamicModel) -> str:
    """The table `dynify convert` prints, as text."""
    from rich.console import Console

    from dynify.cli.convert import summary_table

    console = Console(width=200, record=True)
    console.print(summary_table(dyn))
    return " ".join(console.export_text().split())


@pytest.mark.parametrize("strategy,options", variant_params())
def test_exit_decisions_at_a_tie_follow_the_tensor_rule_in_batch_and_alone(case):
    """Exit cascades: with exit 0's threshold set to a sample's own score exactly, and to the
    next float32 above it, the forward takes exit 0 exactly when `exit_scores >= threshold`
    (the tensor rule, on the logits of that same batch), in a batch and at batch 1 (whose
    Python-float path must settle the tie as the tensor rule does)."""
    from dynify.runtime.decisions import NEVER, exit_scores

    dyn, x = case.dyn, case.x
    if not isinstance(dyn, dynify.ExitCascade) or dyn.policy.kind == "patience":
        pytest.skip("the exit rule of a single score: exit cascades without patience")
    rest = [NEVER] * (dyn.num_thresholds - 1)
    checked = 0
    for xb in [x, *(x[i : i + 1] for i in range(len(x)))]:
        with torch.no_grad():
            scores = exit_scores(dyn.exit_logits(xb)[0], dyn.temperatures[0], dyn.policy.kind)
        for score in scores.tolist():
            above = float(np.nextafter(np.float32(score), np.float32(2.0)))
            for threshold in (score, above):
                if not 0.0 <= threshold <= 1.0:
                    continue
                with torch.no_grad(), thresholds_at(dyn, [threshold, *rest]):
                    dyn(xb)
                expected = scores >= torch.tensor(threshold, dtype=torch.float32)
                assert torch.equal(dyn.last_exit == 0, expected), (len(xb), threshold)
                checked += 1
    assert checked >= 2 * len(x)


# --- 4. artifact round trip ----------------------------------------------------------------


@pytest.mark.parametrize("strategy,options", variant_params())
def test_artifact_round_trip_keeps_outputs_thresholds_and_decisions(case, tmp_path):
    dyn, x = case.dyn, case.x
    path = dynify.save(dyn, tmp_path / "model.dyn")
    loaded = dynify.load(path, model=case.example.model_class())
    assert loaded.strategy == dyn.strategy
    assert thresholds_of(loaded) == thresholds_of(dyn)
    assert loaded.spec["plan"] == dyn.spec["plan"]
    with torch.no_grad():
        for xb in (x, x[:1]):
            assert torch.equal(loaded(xb), dyn(xb))
            assert torch.equal(decisions_of(loaded), decisions_of(dyn))
            assert torch.equal(loaded.last_macs, dyn.last_macs)
        with loaded.static():
            assert torch.equal(loaded(x), call(case.model, x))


# --- 5. the export face, and ONNX parity at forced decisions -------------------------------


EXPORT_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize("strategy,options", variant_params(EXPORT_FAILURES))
def test_export_face_decides_like_the_eager_model(case):
    """The export face in eager PyTorch, thresholds as an input: the model's logits and its
    decisions at every forcing thresholds and at the mixed ones, for a batch and one sample."""
    dyn, x = case.dyn, case.x
    exported = face(dyn)
    seen = set()
    for label, thresholds in [*forcing_thresholds(dyn), ("mixed", case.mixed)]:
        for xb in (x[:1], x):
            with torch.no_grad(), thresholds_at(dyn, thresholds):
                logits, decisions = exported(xb, torch.tensor(thresholds))
                eager = dyn(xb)
            assert (logits - eager).abs().max() <= 1e-6, (label, len(xb))
            assert torch.equal(decisions, decisions_of(dyn)), (label, len(xb))
            seen |= {tuple(row.reshape(-1).tolist()) for row in decisions}
    assert len(seen) >= 2  # the forced thresholds really changed what ran


# A verified ONNX export takes 15 s (masks) to 160 s (four exits) on a shared 2-core machine, so
# this runs with `-m slow`; the export face test above checks the same decisions on every run.
@pytest.mark.parametrize("strategy,options", variant_params(EXPORT_FAILURES, pytest.mark.slow))
def test_onnx_matches_eager_at_forced_decisions(case, tmp_path):
    import onnx
    import onnxruntime as ort

    dyn, x = case.dyn, case.x
    path = dynify.export_onnx(dyn, tmp_path / "model.onnx", verify=False)  # checked below
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == onnx_inputs(dyn)
    assert tuple(o.name for o in graph.output[:2]) == onnx_output_names(dyn)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seen = set()
    for label, thresholds in [*forcing_thresholds(dyn), ("mixed", case.mixed)]:
        for xb in (x[:1], x):
            feed = onnx_feed(dyn, xb, thresholds)
            logits, decisions = session.run(None, feed)[:2]
            with torch.no_grad(), thresholds_at(dyn, thresholds):
                eager = dyn(xb)
            assert np.abs(logits - eager.numpy()).max() <= 1e-4, (label, len(xb))
            assert np.array_equal(decisions, decisions_of(dyn).numpy()), (label, len(xb))
            seen |= {tuple(np.asarray(row).reshape(-1).tolist()) for row in decisions}
    assert len(seen) >= 2  # the forced thresholds really changed what ran


# --- 6. the command line -------------------------------------------------------------------


@pytest.mark.parametrize("strategy,options", variant_params())
def test_cli_converts_with_each_strategy(strategy, options, tmp_path):
    from typer.testing import CliRunner

    from dynify.cli import app

    example = example_of(strategy, options)
    options = strategy_options(options)
    out = tmp_path / "model.dyn"
    model_path = f"{__name__}:{example.model_class.__name__}"
    args = ["convert", model_path, *example.cli_input, "--weights", "random"]
    args += ["--strategy", strategy, "--out", str(out)]
    for key, value in options.items():
        args += ["--option", f"{key}={json.dumps(value)}"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert strategy in result.output and out.name in result.output
    loaded = dynify.load(out, model=example.model_class())
    assert loaded.strategy == strategy
    assert options.items() <= loaded.spec["plan"]["options"].items()
    with torch.no_grad():
        assert loaded(example.inputs()).shape == (BATCH, 5)


def test_cli_inspect_shows_what_the_strategies_work_on():
    from typer.testing import CliRunner

    from dynify.cli import app

    result = CliRunner().invoke(
        app, ["inspect", MODEL_PATH, "--input-size", str(INPUT[-1])], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "Residual blocks (4) in 2 stages" in result.output
    assert "Single-tensor cut points" in result.output
