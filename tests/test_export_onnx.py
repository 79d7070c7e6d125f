"""ONNX export of early-exit cascades: real `If` control flow, parity, skipping, errors.

The cascade tests use a hand-built 3-segment cascade (one Conv per segment) so executed-op
counts are exact; the last tests go through the public API on converted models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import dynify
from dynify.errors import DynifyError, ExportError
from dynify.export import export_onnx as export_dynamic_onnx
from dynify.export.onnx import write_onnx, write_pt2
from dynify.export.verify import count_executed_ops, verify_onnx
from dynify.runtime.cascade import CondCascade
from tests.conftest import TinyResNet, randomize_bn

NUM_CLASSES = 5


@torch.library.custom_op("dynify_test::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation, to exercise the error path."""
    return x * 2


@_no_onnx.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class NoOnnx(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _no_onnx(x)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def _head(c: int) -> nn.Sequential:
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, NUM_CLASSES))
    nn.init.normal_(head[2].weight, std=3.0)  # spread the confidences so thresholds bite
    return head


def _cascade(middle: nn.Module | None = None) -> CondCascade:
    """3 segments / 2 exits on 32x32 inputs; one Conv per segment, as fx GraphModules."""
    torch.manual_seed(0)
    segments = [
        _block(3, 8),
        middle if middle is not None else _block(8, 16),
        nn.Sequential(_block(16, 16), _head(16)),
    ]
    segments = [torch.fx.symbolic_trace(s) for s in segments]
    cascade = CondCascade(segments, [_head(8), _head(16)], [1.0, 1.5], [0.6, 0.6])
    for m in cascade.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return cascade.eval()


def _scores(cascade: CondCascade, x: torch.Tensor) -> list[torch.Tensor]:
    """Eager confidence of every sample at every exit (no early stopping)."""
    out, feat = [], cascade.segments[0](x)
    for i, head in enumerate(cascade.heads):
        logits = head(feat) / cascade.temperatures[i]
        out.append(torch.softmax(logits, -1).amax(-1))
        feat = cascade.segments[i + 1](feat)
    return out


def _reference(cascade: CondCascade, x: torch.Tensor, thr: torch.Tensor) -> tuple:
    """Straightforward per-sample early exit, independent of CondCascade's cond code."""
    logits, exits = [], []
    for sample in x.split(1):
        feat = cascade.segments[0](sample)
        for i, head in enumerate(cascade.heads):
            out = head(feat)
            if torch.softmax(out / cascade.temperatures[i], -1).amax() >= thr[i]:
                break
            feat = cascade.segments[i + 1](feat)
        else:
            out, i = feat, cascade.num_exits
        logits.append(out)
        exits.append(i)
    return torch.cat(logits), torch.tensor(exits)


@pytest.fixture(scope="module")
def cascade() -> CondCascade:
    return _cascade()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mixed_thresholds(cascade: CondCascade, batch: torch.Tensor) -> torch.Tensor:
    """Thresholds halfway between sample scores, so the batch splits over all exits."""
    with torch.no_grad():
        s0, s1 = _scores(cascade, batch)
    t0 = s0.sort().values[len(s0) // 2 - 1 : len(s0) // 2 + 1].mean()
    rest = s1[s0 < t0].sort().values
    t1 = rest[len(rest) // 2 - 1 : len(rest) // 2 + 1].mean()
    return torch.stack([t0, t1])


@pytest.fixture(scope="module")
def onnx_path(cascade: CondCascade, batch: torch.Tensor, tmp_path_factory) -> Path:
    return write_onnx(cascade, batch[:2], tmp_path_factory.mktemp("onnx") / "cascade.onnx").path


def _count(graph: onnx.GraphProto, op: str) -> int:
    n = 0
    for node in graph.node:
        n += node.op_type == op
        for attr in node.attribute:
            if attr.HasField("g"):
                n += _count(attr.g, op)
    return n


def test_eager_cascade_matches_per_sample_reference(cascade, batch, mixed_thresholds):
    with torch.no_grad():
        logits, exits = cascade(batch, mixed_thresholds)
        ref_logits, ref_exits = _reference(cascade, batch, mixed_thresholds)
    assert torch.equal(exits, ref_exits)
    assert len(set(exits.tolist())) == 3  # the thresholds really mix the exits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_graph_has_nested_if_and_thresholds_input_with_default(onnx_path, cascade):
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert _count(model.graph, "If") == cascade.num_exits
    assert _count(model.graph, "Conv") == 3
    assert [i.name for i in model.graph.input] == ["x", "thresholds"]
    assert [o.name for o in model.graph.output] == ["logits", "decisions"]
    default = {i.name: i for i in model.graph.initializer}["thresholds"]
    np.testing.assert_allclose(onnx.numpy_helper.to_array(default), [0.6, 0.6])
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnxruntime_parity(onnx_path, cascade, batch, mixed_thresholds):
    thresholds = [[0.0, 0.0], [1.01, 1.01], mixed_thresholds, [1.01, 0.0], None]
    report = verify_onnx(cascade, onnx_path, [batch[:1], batch[1:2], batch], thresholds)
    assert report.ok, str(report)
    assert report.max_abs_diff < 1e-4
    assert len(report.cases) == 15
    full = [c for c in report.cases if c.batch == len(batch)]
    assert [c.thresholds is None for c in full] == [False] * 4 + [True]
    assert [set(c.exits_onnx) for c in full[:4]] == [{0}, {2}, {0, 1, 2}, {1}]


def test_batch_matches_one_sample_at_a_time(onnx_path, cascade, batch, mixed_thresholds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed_thr = mixed_thresholds.numpy()
    logits, exits = session.run(None, {"x": batch.numpy(), "thresholds": feed_thr})
    for j in range(len(batch)):
        one_logits, one_exit = session.run(
            None, {"x": batch[j : j + 1].numpy(), "thresholds": feed_thr}
        )
        assert exits[j] == one_exit[0]
        np.testing.assert_allclose(logits[j], one_logits[0], atol=1e-5)
    with torch.no_grad():
        ref_logits, ref_exits = _reference(cascade, batch, mixed_thresholds)
    np.testing.assert_array_equal(exits, ref_exits.numpy())
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)


def test_thresholds_input_decides_how_many_convs_run(onnx_path, batch):
    x = batch[:1]
    assert count_executed_ops(onnx_path, x, [0.0, 0.0]) == 1
    assert count_executed_ops(onnx_path, x, [1.01, 0.0]) == 2
    assert count_executed_ops(onnx_path, x, [1.01, 1.01]) == 3
    assert count_executed_ops(onnx_path, batch, [0.0, 0.0]) == 1


def test_omitted_thresholds_input_uses_the_default(onnx_path, cascade, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert "thresholds" in {i.name for i in session.get_overridable_initializers()}
    omitted = session.run(None, {"x": batch.numpy()})
    fed = session.run(None, {"x": batch.numpy(), "thresholds": np.array([0.6, 0.6], np.float32)})
    never = session.run(None, {"x": batch.numpy(), "thresholds": np.full(2, 1.01, np.float32)})
    np.testing.assert_array_equal(omitted[1], fed[1])
    np.testing.assert_array_equal(omitted[0], fed[0])
    assert not np.array_equal(omitted[1], never[1])
    with torch.no_grad():
        _, eager_exits = cascade(batch)
    np.testing.assert_array_equal(omitted[1], eager_exits.numpy())


def test_parity_report_flags_a_mismatching_model(onnx_path, batch):
    other = _cascade()
    with torch.no_grad():
        other.segments[2].get_submodule("1.2").bias.add_(1.0)
    report = verify_onnx(other, onnx_path, [batch[:1]], [[1.01, 1.01], [0.0, 0.0]])
    assert not report.ok
    assert report.cases[0].max_abs_diff > 0.5  # final classifier differs
    assert report.cases[1].max_abs_diff < 1e-4  # exit 0 is unchanged
    assert "FAILED" in str(report)


def test_unsupported_op_is_a_clear_error(tmp_path):
    bad = _cascade(middle=nn.Sequential(_block(8, 16), NoOnnx()))
    with pytest.raises(ExportError) as info:
        write_onnx(bad, torch.randn(1, 3, 32, 32), tmp_path / "bad.onnx", dynamic_batch=False)
    message = str(info.value)
    assert "dynify_test.no_onnx" in message
    assert "graph node" in message
    assert "module `segments.1`" in message
    assert not (tmp_path / "bad.onnx").exists()


def test_pt2_keeps_the_conds(cascade, batch, mixed_thresholds, tmp_path):
    path = write_pt2(cascade, batch[:2], tmp_path / "cascade.pt2")
    program = torch.export.load(path)
    n_cond = sum(
        1
        for gm in program.graph_module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for node in gm.graph.nodes
        if node.target is torch.ops.higher_order.cond
    )
    assert n_cond == cascade.num_exits
    with torch.no_grad():
        logits, exits = program.module()(batch, mixed_thresholds)
        ref_logits, ref_exits = cascade(batch, mixed_thresholds)
    assert torch.equal(exits, ref_exits)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_bad_cascade_shapes_are_rejected():
    with pytest.raises(ExportError, match="k \\+ 1 segments"):
        CondCascade([nn.Identity()], [nn.Identity()], [1.0], [0.5])
    with pytest.raises(ExportError, match="thresholds"):
        CondCascade([nn.Identity()] * 2, [nn.Identity()], [1.0], [0.5, 0.5])


def test_batch_all_policy_exits_together(cascade, batch, mixed_thresholds):
    together = cascade.with_batch_policy("batch_all").eval()
    with torch.no_grad():
        _, exits = together(batch, mixed_thresholds)
        _, per_sample_exits = cascade(batch, mixed_thresholds)
        one_logits, one_exit = together(batch[:1], mixed_thresholds)
        ref_logits, ref_exit = cascade(batch[:1], mixed_thresholds)
    assert len(set(exits.tolist())) == 1
    assert exits[0] >= per_sample_exits.max()  # leaves only once every sample is confident
    assert torch.equal(one_exit, ref_exit)  # N = 1: the two policies agree
    torch.testing.assert_close(one_logits, ref_logits)


def test_public_export_of_the_batch_all_policy(tmp_path):
    """`dynify.export_onnx(..., batch_policy="batch_all")` writes the one-decision-per-batch
    graph, verified in ONNX Runtime against that policy; strategies without exits refuse it."""
    torch.manual_seed(0)
    dyn = dynify.convert(TinyResNet(), "early-exit", torch.randn(1, 3, 32, 32))
    path = dynify.export_onnx(dyn, tmp_path / "together.onnx", batch_policy="batch_all")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    thresholds = np.full(dyn.num_thresholds, 0.5, np.float32)
    exits = session.run(None, {"x": x.numpy(), "thresholds": thresholds})[1]
    assert len(set(exits.tolist())) == 1  # the batch leaves together
    gates = dynify.convert(TinyResNet(), "block-gates", torch.randn(1, 3, 32, 32))
    with pytest.raises(ExportError, match="exit cascades"):
        dynify.export_onnx(gates, tmp_path / "gates.onnx", batch_policy="batch_all")
    assert not (tmp_path / "gates.onnx").exists()


# --- exit policies: the cascade decides exactly like the eager EarlyExitModel --------------


class TinyWithCustomOp(TinyResNet):
    """TinyResNet with an op that has no ONNX translation after the second block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = _no_onnx(torch.relu(self.down(x) + self.block2(x)))
        x = self.tail(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _converted(policy: str, model: nn.Module | None = None) -> dynify.DynamicModel:
    """TinyResNet with 2 exits and random (non-zero) heads, so exits fire."""
    torch.manual_seed(0)
    model = randomize_bn(model if model is not None else TinyResNet())
    dyn = dynify.convert(
        model,
        "early-exit",
        torch.randn(1, 3, 16, 16),
        options={"exits": 2, "policy": policy, "patience": 2},
    )
    for head in dyn.heads:
        nn.init.normal_(head.classifier.weight, std=2.0)
    dyn.temperatures.copy_(torch.tensor([1.0, 1.3]))
    return dyn.eval()


@pytest.mark.parametrize("policy", ["confidence", "entropy", "patience"])
def test_export_face_decides_like_the_eager_model(policy):
    dyn = _converted(policy)
    cascade = dyn.export_face()
    assert isinstance(cascade, CondCascade) and cascade.policy == policy
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    seen = set()
    for thr in ([0.0, 0.0], [0.3, 0.3], [0.5, 0.6], [0.7, 0.4], [1.01, 0.0], [1.01, 1.01]):
        dyn.set_thresholds(thr)
        with torch.no_grad():
            eager = dyn(x)
            logits, exits = cascade(x, torch.tensor(thr))
        assert torch.equal(exits, dyn.last_exit), (policy, thr)
        torch.testing.assert_close(logits, eager, atol=1e-6, rtol=1e-6)
        seen |= set(exits.tolist())
    assert seen == ({1, 2} if policy == "patience" else {0, 1, 2})
    if policy == "patience":  # exit 0 has no history: a streak of 1 < patience 2
        assert 0 not in seen


def test_patience_policy_survives_onnx(tmp_path):
    dyn = _converted("patience")
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    cases = [[0.0, 0.0], [0.5, 0.5], [1.01, 1.01]]
    result = write_onnx(
        dyn.export_face(),
        x[:2],
        tmp_path / "patience.onnx",
        inputs=[x[:1], x],
        thresholds_list=cases,
        reference=dyn,
    )
    assert result.if_nodes == 2
    assert result.report.ok, str(result.report)
    full = [c.exits_onnx for c in result.report.cases if c.batch == 8]  # in `cases` order
    # Threshold 0: leave as soon as two consecutive exits agree, i.e. at exit 1 at the earliest.
    with torch.no_grad():
        first, second = (lg.argmax(-1) for lg in dyn.exit_logits(x)[:2])
    agree = first == second
    assert 0 < int(agree.sum()) < len(x)
    assert torch.equal(torch.tensor(full[0]) == 1, agree)
    assert set(full[0]) == {1, 2}
    assert set(full[-1]) == {2}


def test_unsupported_op_through_the_public_api(tmp_path):
    dyn = _converted("confidence", TinyWithCustomOp())
    with pytest.raises(DynifyError) as info:
        export_dynamic_onnx(dyn, tmp_path / "bad.onnx")
    assert isinstance(info.value, ExportError)
    message = str(info.value)
    assert "dynify_test.no_onnx" in message  # the op
    assert "graph node" in message  # the exported graph's node
    assert "module `segments." in message and "fx node `no_onnx" in message  # where in the model
    assert not (tmp_path / "bad.onnx").exists()


def test_branches_enter_through_an_identity_pool(onnx_path, cascade):
    """Each branch that goes on starts with a 1x1 max-pool (ONNX Runtime's layout pass keeps the
    branch's residual blocks in its blocked layout from there); eager skips it."""
    from dynify.runtime.cascade import branch_entry

    pools = []

    def collect(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            pools.extend([node] if node.op_type == "MaxPool" else [])
            for attr in node.attribute:
                if attr.HasField("g"):
                    collect(attr.g)

    collect(onnx.load(onnx_path).graph)
    assert len(pools) == cascade.num_exits
    for pool in pools:
        attrs = {a.name: list(a.ints) for a in pool.attribute}
        assert attrs["kernel_shape"] == [1, 1] and attrs.get("strides", [1, 1]) == [1, 1]
    x = torch.randn(2, 8, 4, 4)
    assert branch_entry(x) is x


def test_a_graph_for_batch_one_has_no_per_sample_bookkeeping(onnx_path, cascade, batch, tmp_path):
    """At a fixed batch of 1, a sample that does not leave is the whole batch: the branches
    run the next segment directly, without NonZero/gather/scatter, with the same results."""
    one = write_onnx(cascade, batch[:1], tmp_path / "one.onnx", dynamic_batch=False).path
    model = onnx.load(one)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert _count(model.graph, "If") == cascade.num_exits
    assert _count(model.graph, "NonZero") == _count(model.graph, "ScatterND") == 0
    assert _count(onnx.load(onnx_path).graph, "NonZero") == cascade.num_exits  # any batch
    thresholds = [[0.0, 0.0], [1.01, 0.0], [1.01, 1.01], None]
    report = verify_onnx(cascade, one, [batch[:1], batch[1:2], batch[2:3]], thresholds)
    assert report.ok, str(report)
    assert {e for c in report.cases for e in c.exits_onnx} == {0, 1, 2}


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def _branch_adds_after_ort_layout(path: Path, tmp_path: Path) -> tuple[int, int]:
    """(plain `Add`s inside `If` branches, NCHWc nodes anywhere) of ORT's optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    adds = nchwc = 0

    def walk(graph: onnx.GraphProto, in_branch: bool) -> None:
        nonlocal adds, nchwc
        for node in graph.node:
            adds += in_branch and node.op_type == "Add" and node.domain in ("", "ai.onnx")
            nchwc += node.domain == "com.microsoft.nchwc"
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g, True)

    walk(onnx.load(tmp_path / "optimized.onnx").graph, False)
    return adds, nchwc


def test_branch_residual_blocks_stay_in_ort_fast_layout(tmp_path, monkeypatch):
    """With the entry pool, ONNX Runtime's NCHWc pass fuses every residual `Add` of the
    branches into its convolutions; without it the `Add`s stay plain (reorders around each)."""
    import dynify.runtime.cascade as cascade_module

    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    last = nn.Sequential(_Residual(16), _head(16))
    cascade = CondCascade([stem, _Residual(16), last], [_head(16), _head(16)], [1, 1], [0.5, 0.5])
    x = torch.randn(1, 3, 16, 16)
    with_pool = write_onnx(cascade.eval(), x, tmp_path / "pool.onnx", dynamic_batch=False).path
    adds, nchwc = _branch_adds_after_ort_layout(with_pool, tmp_path)
    if nchwc == 0:
        pytest.skip("ONNX Runtime's NCHWc layout pass is not active on this CPU")
    assert adds == 0
    monkeypatch.setattr(cascade_module, "branch_entry", lambda feat: feat)
    plain = write_onnx(cascade, x, tmp_path / "plain.onnx", dynamic_batch=False).path
    assert _branch_adds_after_ort_layout(plain, tmp_path)[0] == 2  # one per branch block


def _hostile(batch: torch.Tensor) -> torch.Tensor:
    """Samples with one pixel NaN, +inf, -inf and huge (finite), next to normal ones."""
    x = batch[:6].clone()
    for i, value in enumerate([float("nan"), float("inf"), float("-inf"), 3e38]):
        x[i, 0, 3, 3] = value
    return x


def test_a_forced_exit_holds_for_non_finite_and_huge_inputs(onnx_path, cascade, batch, tmp_path):
    """A MAC cap forces an exit with threshold 0: every input leaves there at the latest, in
    eager, ONNX Runtime and the pt2 program alike (a NaN score is certain, never skipped)."""
    from dynify.export.verify import ort_session

    x = _hostile(batch)
    forced = torch.tensor([1.01, 0.0])  # exit 0 off, exit 1 the cap
    session = ort_session(onnx_path)
    program = torch.export.load(write_pt2(cascade, batch[:2], tmp_path / "c.pt2")).module()
    with torch.no_grad():
        eager = cascade(x, forced)[1]
        pt2 = program(x, forced)[1]
    onnx_exits = session.run(None, {"x": x.numpy(), "thresholds": forced.numpy()})[1]
    assert eager.tolist() == [1] * len(x)
    assert pt2.tolist() == [1] * len(x)
    assert onnx_exits.tolist() == [1] * len(x)
