"""Block gates (function, halting, policy): static equivalence, real skipping, budgets, ONNX."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynify
from dynify.errors import StrategyError
from dynify.models.cifar_resnet import CifarResNet, cifar_resnet20
from dynify.runtime.model import INPUT_NAMES, OUTPUT_NAMES
from tests.conftest import randomize_bn

KINDS = ("function", "halting", "policy")


class TwoStages(nn.Module):
    """Four residual blocks in two stages: identity shortcuts and one 1x1 projection."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b0 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.b3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b0(x))
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.down(x) + self.b2(x))
        x = torch.relu(x + self.b3(x))
        x = torch.relu(x + self.b4(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def two_stages() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TwoStages())


def spread_deciders(dyn, seed: int = 0):
    """Random, sample-dependent decision units (fresh gates are open for every sample)."""
    generator = torch.Generator().manual_seed(seed)
    units = [g.decider for g in dyn.gates if g.decider is not None]
    if dyn.policy is not None:
        units.append(dyn.policy.fc)
    with torch.no_grad():
        for unit in units:
            for name, p in unit.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * 4.0 / p.shape[-1] ** 0.5)
    return dyn


def branch_conv_calls(dyn) -> tuple[dict[int, list[int]], list[int]]:
    """Per gate, a counter of calls to the convs of its branch and of its shortcut."""
    calls: dict[int, list[int]] = {}
    short: list[int] = [0]
    for gate in dyn.gates:
        counter = calls.setdefault(gate.index, [0])
        for module in gate.branch.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda *_, c=counter: c.__setitem__(0, c[0] + 1))
        if gate.shortcut is not None:
            for module in gate.shortcut.modules():
                if isinstance(module, nn.Conv2d):
                    module.register_forward_hook(lambda *_: short.__setitem__(0, short[0] + 1))
    return calls, short


@pytest.mark.parametrize("kind", KINDS)
def test_static_and_threshold_above_one_equal_the_original(kind):
    model = randomize_bn(cifar_resnet20())
    x = torch.randn(4, 3, 32, 32)
    dyn = spread_deciders(dynify.convert(model, "block-gates", x[:1], options={"gate": kind}))
    with torch.no_grad():
        expected = model(x)
        with dyn.static():
            static = dyn(x)
        assert dyn.last_macs.tolist() == [dyn.static_macs] * 4
        dyn.set_thresholds(1.01)
        full = dyn(x)
    assert torch.equal(static, expected)
    assert torch.equal(full, expected)
    assert dyn.last_macs.tolist() == [dyn.static_macs] * 4
    assert dyn.last_gates.all()


@pytest.mark.parametrize("kind", KINDS)
def test_all_gates_shut_runs_no_branch(kind):
    """Threshold 0: no gated branch runs (hook counts); projection shortcuts still do."""
    model = two_stages()
    x = torch.randn(3, 3, 16, 16)
    dyn = dynify.convert(model, "block-gates", x[:1], options={"gate": kind})
    calls, short = branch_conv_calls(dyn)
    dyn.set_thresholds(0.0)
    with torch.no_grad():
        out = dyn(x)
    assert all(c == [0] for c in calls.values())
    assert not dyn.last_gates.any()
    if kind == "halting":  # the first block of each stage always runs (ACT)
        assert dyn.gate_names == ["add_1", "add_3", "add_4"]
        assert dyn.last_macs.tolist() == [dyn.last_macs[0].item()] * 3
    else:
        assert len(dyn.gates) == 5
        assert short == [1]  # block b2 was skipped, its 1x1 projection ran alone
        assert dyn.last_macs.tolist() == [dyn.min_macs()] * 3
        # what the skipped network computes, written out by hand
        with torch.no_grad():
            h = model.stem(x)
            h = torch.relu(torch.relu(h))
            h = torch.relu(torch.relu(model.down(h)))
            expected = model.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    "kind",
    [
        "function",
        pytest.param("halting", marks=pytest.mark.slow),
        pytest.param("policy", marks=pytest.mark.slow),
    ],
)
def test_trained_gate_reaches_its_budget(kind):
    """Fine-tuning the decision units alone steers inference MACs to the budget (5 points)."""
    torch.manual_seed(0)
    model = randomize_bn(CifarResNet((5, 5, 5)))
    budget = 0.6
    dyn = dynify.convert(
        model, "block-gates", torch.randn(1, 3, 8, 8), options={"gate": kind, "budget": budget}
    ).eval()
    params = [p for n, p in dyn.named_parameters() if ".decider." in n or n.startswith("policy.")]
    optimizer = torch.optim.Adam(params, lr=0.01)
    generator = torch.Generator().manual_seed(0)

    def batch(n):  # images of varying contrast: some samples need more depth than others
        scale = torch.exp(torch.randn(n, 1, 1, 1, generator=generator))
        return torch.randn(n, 3, 8, 8, generator=generator) * scale

    for _ in range(250):
        x = batch(32)
        with torch.no_grad():
            teacher = model(x)
        loss, metrics = dyn.training_loss(x, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(metrics) >= {"loss", "distill", "compute", "macs_fraction"}
    with torch.no_grad():
        dyn(batch(512))
    assert dyn.mean_macs_fraction() == pytest.approx(budget, abs=0.05)


def test_training_loss_reaches_every_decision_unit_and_uses_labels():
    model = two_stages()
    x = torch.randn(8, 3, 16, 16)
    for kind, estimator in [("function", "gumbel"), ("halting", "gumbel"), ("policy", "reinforce")]:
        dyn = dynify.convert(
            model, "block-gates", x[:1], options={"gate": kind, "estimator": estimator}
        )
        loss, metrics = dyn.training_loss(x, model(x).detach(), labels=torch.arange(8) % 5)
        loss.backward()
        assert torch.isfinite(loss) and "ce" in metrics
        units = [g.decider for g in dyn.gates if g.decider is not None] or [dyn.policy]
        for unit in units:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unit.parameters())
        convs = [m for m in dyn.gates[0].branch.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.weight.grad is not None for c in convs)  # the backbone learns too


def test_model_without_residual_blocks_gets_a_clear_error():
    vgg = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with pytest.raises(
        StrategyError, match="no residual blocks.*apply to this model: .*early-exit"
    ):
        dynify.convert(vgg, "block-gates", torch.randn(1, 3, 8, 8))


def test_bad_options_are_clear_errors():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(StrategyError, match="Unknown gate 'maybe'"):
        dynify.convert(two_stages(), "block-gates", x, options={"gate": "maybe"})
    with pytest.raises(StrategyError, match="Unknown block-gates option"):
        dynify.convert(two_stages(), "block-gates", x, options={"gates": "function"})
    with pytest.raises(StrategyError, match="not residual joins"):
        dynify.convert(two_stages(), "block-gates", x, options={"blocks": ["relu"]})


# --- ONNX -------------------------------------------------------------------------------------


def _executed_convs(path: str, feed: dict) -> int:
    """Conv nodes ONNX Runtime ran (profiling, no graph rewrites): proves the If skipped."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "p")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return sum(
        1
        for e in events
        if e.get("cat") == "Node"
        and e.get("name", "").endswith("_kernel_time")
        and e.get("args", {}).get("op_name") == "Conv"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_parity_and_skipping(kind, tmp_path):
    import onnx
    import onnxruntime as ort

    model = two_stages()
    x = torch.randn(3, 3, 16, 16) * torch.exp(torch.randn(3, 1, 1, 1))
    dyn = spread_deciders(dynify.convert(model, "block-gates", x[:1], options={"gate": kind}))
    face = dyn.export_face().eval()
    ep = torch.export.export(
        face,
        (x[:2], dyn.thresholds.clone()),
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}, "thresholds": None},
        strict=False,
    )
    program = torch.onnx.export(
        ep, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES)
    )
    path = str(tmp_path / "gates.onnx")
    program.save(path)
    graph = onnx.load(path).graph
    assert sum(n.op_type == "If" for n in graph.node) == dyn.num_gates
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    runs = set()
    for t in (0.0, 0.5, 0.8, 1.01):
        thresholds = torch.full_like(dyn.thresholds, t)
        dyn.set_thresholds(t)
        for xb in (x[:1], x):
            logits, executed = session.run(
                None, {"x": xb.numpy(), "thresholds": thresholds.numpy()}
            )
            with torch.no_grad():
                eager = dyn(xb)
            assert np.abs(logits - eager.numpy()).max() <= 1e-4
            assert np.array_equal(executed.astype(bool), dyn.last_gates.numpy())
            runs.add(int(executed.sum()))
    assert len(runs) >= 2
    x1 = x[:1].numpy()
    policy_convs = 2 if kind == "policy" else 0
    shut = _executed_convs(path, {"x": x1, "thresholds": np.zeros(len(dyn.thresholds), "f4")})
    full = _executed_convs(path, {"x": x1, "thresholds": np.full(len(dyn.thresholds), 1.01, "f4")})
    assert full - shut == dyn.num_gates  # each gated branch (one conv) skipped at threshold 0
    assert full == 7 + policy_convs  # stem + 5 branches + projection (+ policy)


# --- the rest of the pipeline: CLI, fine-tuning loop, calibration ----------------------------


def test_cli_convert_with_gate_option(tmp_path):
    from typer.testing import CliRunner

    from dynify.cli import app

    out = tmp_path / "r20.dyn"
    result = CliRunner().invoke(
        app,
        ["convert", "cifar_resnet20", "--weights", "random", "--strategy", "block-gates",
         "--gate", "halting", "--out", str(out)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    dyn = dynify.load(out)
    assert dyn.kind == "halting" and dyn.num_gates == 6 and len(dyn.thresholds) == 3


def test_generic_finetune_and_calibrate_work_on_block_gates():
    """dynify.finetune (heads mode: only the gates learn) and the scalar-sweep calibration."""
    from dynify.train.calibrate import calibrate
    from dynify.train.distill import finetune

    model = two_stages()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=generator)
    y = model(x).argmax(-1).detach()
    dyn = dynify.convert(model, "block-gates", x[:1], options={"gate": "function"})
    before = {k: v.clone() for k, v in dyn.state_dict().items()}
    finetune(
        dyn, (x, y), mode="heads", epochs=2, batch_size=16, lr=0.05, budget=0.5,
        calibration_fraction=0.0, augment=False, progress=False,
    )  # fmt: skip
    after = dyn.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the backbone stayed frozen; the decision units and the learnt compute price moved
    assert changed and all(".decider." in k or k == "budget_multiplier" for k in changed)
    with torch.no_grad(), dyn.static():
        assert torch.equal(dyn(x), model(x))
    result = calibrate(dyn, (x, y), budget=0.7, part="all")  # the data it trained on, knowingly
    assert result.macs_fraction <= 0.7 + 1e-9
    with torch.no_grad():
        dyn(x)
    assert dyn.mean_macs_fraction() == pytest.approx(result.macs_fraction, abs=1e-6)


def test_joint_finetune_uses_the_gates_recipe_and_resumes_exactly(tmp_path):
    """Joint mode on gates: Adam for the decision units, clipped SGD for the backbone, frozen
    batch-norm statistics; the two optimizers checkpoint and resume as one."""
    from dynify.train.distill import finetune

    model = two_stages()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=generator)
    y = model(x).argmax(-1).detach()

    def fresh():  # the same decision units each time (they are initialised at random)
        torch.manual_seed(1)
        return dynify.convert(model, "block-gates", x[:1], options={"gate": "function"})

    kwargs = dict(
        mode="joint", epochs=2, batch_size=16, budget=0.5, calibration_fraction=0.0,
        augment=False, progress=False,
    )  # fmt: skip
    reference = fresh()
    stats = {k: v.clone() for k, v in reference.state_dict().items() if "running_" in k}
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    finetune(reference, (x, y), **kwargs)
    after = reference.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items())  # BN statistics kept
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".decider." in k for k in moved) and any(".decider." not in k for k in moved)

    ckpt = tmp_path / "run.ckpt"

    def stop(info):
        if info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(fresh(), (x, y), checkpoint=ckpt, callback=stop, **kwargs)
    state = torch.load(ckpt, weights_only=True)
    assert len(state["optimizer"]["optimizers"]) == 2  # SGD (backbone) + Adam (gates)
    resumed = fresh()
    finetune(resumed, (x, y), checkpoint=ckpt, resume=True, **kwargs)
    for (k, a), b in zip(after.items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_policy_folds_batch_norm_at_inference_only():
    """Eval + no_grad runs the policy with BN folded into its convs: the same logits, a cache
    that follows weight changes, and training still sees the unfolded network."""
    options = {"gate": "policy"}
    dyn = dynify.convert(two_stages(), "block-gates", torch.randn(1, 3, 16, 16), options=options)
    policy = dyn.policy
    randomize_bn(policy)
    with torch.no_grad():
        policy.fc.weight.normal_()
    x = torch.randn(3, 3, 16, 16)
    policy.eval()
    unfolded = policy(x)  # grad enabled: the module path
    with torch.no_grad():
        torch.testing.assert_close(policy(x), unfolded.detach(), atol=1e-5, rtol=1e-5)
        policy.features[1].running_mean.add_(0.5)  # in place: the cache must notice
        moved = policy(x)
    torch.testing.assert_close(moved, policy(x).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moved, unfolded.detach())
    policy.train()
    policy(x).sum().backward()
    assert policy.features[0].weight.grad is not None


def test_batch_one_policy_plan_equals_the_tensor_plan_at_ties():
    """The batch-1 plan (Python floats) is the float32 tensor plan, also for thresholds placed
    exactly on, or one float32 step beside, a gate's probability."""
    dyn = dynify.convert(
        two_stages(), "block-gates", torch.randn(1, 3, 16, 16), options={"gate": "policy"}
    ).eval()
    randomize_bn(dyn.policy)
    with torch.no_grad():
        dyn.policy.fc.weight.normal_()
        x = torch.randn(1, 3, 16, 16)
        probs = torch.sigmoid(dyn.policy(x).float())[0]
        for step in (None, 0.0, 2.0):
            on_tie = 1.0 - probs  # float32: 1 - t lands on or next to the probability
            if step is not None:
                on_tie = torch.nextafter(on_tie, torch.full_like(on_tie, step))
            dyn.set_thresholds(on_tie.tolist())
            exact = (torch.sigmoid(dyn.policy(x).float())[0] > 1.0 - dyn.thresholds).tolist()
            assert dyn._plan_one(x, dyn.thresholds.tolist()) == exact


def test_batch_one_function_gate_decides_like_the_tensor_rule_at_ties():
    """A function gate at batch 1 (Python floats) takes the float32 tensor rule's decision for
    thresholds placed on, or one float32 step beside, its probability (the tie rule)."""
    from dynify.runtime.decisions import gate_open, gate_probability, sigmoid_one

    torch.manual_seed(0)  # fresh gates: open (p ~ 0.95), where float32 steps are coarse
    dyn = dynify.convert(two_stages(), "block-gates", torch.randn(1, 3, 16, 16)).eval()
    gate = dyn.gates[0]  # its input does not depend on any threshold
    x, entries = _entries_at_batch_one(dyn, gate)
    ties = 0
    with torch.no_grad():
        for i, entry in enumerate(entries):
            logit = gate.decider(entry)
            prob = gate_probability(logit)[0]
            for step in (None, 0.0, 2.0):
                on_tie = 1.0 - prob
                if step is not None:
                    on_tie = torch.nextafter(on_tie, torch.tensor(step))
                dyn.set_thresholds([float(on_tie)] + [1.01] * (dyn.num_gates - 1))
                dyn(x[i : i + 1])
                expected = bool(gate_open(prob, dyn.thresholds[0]))
                assert bool(dyn.last_gates[0, 0]) == expected, (i, step)
                double = sigmoid_one(float(logit)) > 1.0 - float(dyn.thresholds[0])
                ties += double != expected
    assert ties  # some cases are real ties: double precision alone would decide otherwise


def test_batch_one_halting_decides_like_the_tensor_rule_at_ties():
    """A halting stage at batch 1 (Python floats) halts as the float32 tensor rule does when
    the threshold sits on, or one float32 step beside, the cumulative halting score."""
    from dynify.runtime.decisions import gate_probability, halting_update, sigmoid_one

    dyn = spread_deciders(
        dynify.convert(
            two_stages(), "block-gates", torch.randn(1, 3, 16, 16), options={"gate": "halting"}
        )
    ).eval()
    gate = dyn.gates[0]  # the first scored block of stage 0: its input is block 0's output
    assert gate.group == 0
    x, entries = _entries_at_batch_one(dyn, gate)
    ties = 0
    with torch.no_grad():
        for i, entry in enumerate(entries):
            logit = gate.decider(entry)
            h = gate_probability(logit)
            for step in (None, 0.0, 2.0):
                on_tie = h[0] if step is None else torch.nextafter(h[0], torch.tensor(step))
                dyn.set_thresholds([float(on_tie), 1.01])
                dyn(x[i : i + 1])
                _, stop, _ = halting_update(torch.zeros(1), h, dyn.thresholds[0])
                assert bool(dyn.last_gates[0, 0]) == (not bool(stop[0])), (i, step)
                double = sigmoid_one(float(logit)) >= float(dyn.thresholds[0])
                ties += double != bool(stop[0])
    assert ties  # some cases are real ties: double precision alone would decide otherwise


def test_converted_graphs_keep_children_as_plain_attributes(tmp_path):
    """`bind_children`: a traced graph's path lookups skip `Module.__getattr__`; the state dict,
    a replaced child and a deep copy stay consistent."""
    import copy

    from dynify.runtime.fast_access import bind_children

    model = cifar_resnet20()
    dyn = dynify.convert(model, "block-gates", torch.randn(1, 3, 32, 32))
    branch = dyn.gates[0].branch
    assert "layer1" in branch.__dict__ and "gm" in dyn.__dict__
    assert list(dyn.state_dict()) == list(bind_children(copy.deepcopy(dyn)).state_dict())
    clone = copy.deepcopy(dyn)  # copies alias the copied children (GraphModules drop theirs)
    assert clone.__dict__["gm"] is clone._modules["gm"] is not dyn.gm
    assert clone.gm.__dict__.get("gate_0", clone.gm.gate_0) is clone.gm._modules["gate_0"]
    dynify.save(dyn, tmp_path / "g.dyn")
    loaded = dynify.load(tmp_path / "g.dyn", model=cifar_resnet20())
    assert "layer1" in loaded.gates[0].branch.__dict__
    replacement = nn.Identity()
    dyn.gm.bn1 = replacement  # nn.Module.__setattr__ drops the stale instance entry
    assert dyn.gm.bn1 is replacement


def test_skipped_identity_block_after_a_relu_costs_no_op():
    """The wrapper takes over the ReLU after the join, so at batch 1 a skipped identity block
    whose input is a ReLU's output hands that very tensor on (no add, no ReLU)."""
    dyn = dynify.convert(cifar_resnet20(), "block-gates", torch.randn(1, 3, 32, 32))
    dyn.eval().set_thresholds(0.0)  # every gate shut
    assert all(g.relu_after for g in dyn.gates)
    seen = []
    hooks = [
        g.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0] is out)))
        for g in dyn.gates
    ]
    with torch.no_grad():
        dyn(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == dyn.num_gates
    for gate, passed_on in seen:
        assert passed_on == (gate.shortcut is None), gate


def _entries_at_batch_one(dyn, gate) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """16 seeded images, and what `gate` receives for each run alone, as the batch-1 path
    computes it (in static mode, so no threshold changes the gate's input)."""
    entries = []
    hook = gate.register_forward_pre_hook(lambda module, args: entries.append(args[0]))
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), dyn.static():
            for sample in x.split(1):
                dyn(sample)
    finally:
        hook.remove()
    return x, entries


def test_gate_plan_names_each_gated_block_and_its_shortcut():
    dyn = dynify.convert(two_stages(), "block-gates", torch.randn(1, 3, 16, 16))
    plan = dyn.gate_plan()
    assert [g.join for g in plan] == dyn.gate_names
    assert [g.block for g in plan] == ["b0", "b1", "b2", "b3", "b4"]
    assert [g.identity_shortcut for g in plan] == [True, True, False, True, True]
    assert [g.branch_macs for g in plan] == dyn.branch_macs()
    assert [g.threshold for g in plan] == list(range(5))
    halting = dynify.convert(
        two_stages(), "block-gates", torch.randn(1, 3, 16, 16), options={"gate": "halting"}
    )
    assert [g.threshold for g in halting.gate_plan()] == [0, 1, 1]  # the stages' thresholds
