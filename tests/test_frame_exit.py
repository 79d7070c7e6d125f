"""frame-exit: clip models look at their frames one at a time and stop once the running average
of the per-frame logits is sure. The contract tests (tests/test_contract.py) cover static
exactness, batch vs alone, MAC books, artifacts and export; these check what is particular."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dynify
from dynify.errors import DynifyError, StrategyError
from dynify.frontend import profile, symbolic_trace
from dynify.frontend.clips import CLIP, clip_pattern
from dynify.passes.frame_exit import frame_order
from dynify.runtime.decisions import NEVER, exit_scores
from tests.conftest import randomize_bn

T, SHAPE = 4, (3, 12, 12)


def frame_network(num_classes: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


class FlattenClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.frame = frame_network()

    def forward(self, clip: Tensor) -> Tensor:
        logits = self.frame(clip.flatten(0, 1))
        return logits.unflatten(0, (clip.shape[0], clip.shape[1])).mean(1)


class ReshapeClip(FlattenClip):
    """The other common spelling: reshape to [N * T, ...], view back to [N, T, K]."""

    def forward(self, clip: Tensor) -> Tensor:
        n, t, c, h, w = clip.shape
        logits = self.frame(clip.reshape(n * t, c, h, w))
        return logits.view(n, t, -1).mean(dim=-2)


class MaxOverTime(FlattenClip):
    def forward(self, clip: Tensor) -> Tensor:
        logits = self.frame(clip.flatten(0, 1))
        return logits.unflatten(0, (clip.shape[0], clip.shape[1])).amax(1)


class ReadsWholeClip(FlattenClip):
    def forward(self, clip: Tensor) -> Tensor:
        logits = self.frame(clip.flatten(0, 1) - clip.mean())
        return logits.unflatten(0, (clip.shape[0], clip.shape[1])).mean(1)


class HeadAfterMean(FlattenClip):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 5)

    def forward(self, clip: Tensor) -> Tensor:
        logits = self.frame(clip.flatten(0, 1))
        return self.head(logits.unflatten(0, (clip.shape[0], clip.shape[1])).mean(1))


class ImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.frame = frame_network()

    def forward(self, x: Tensor) -> Tensor:
        return self.frame(x)


def make(cls: type[nn.Module] = FlattenClip) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(cls())
    with torch.no_grad():
        model.frame[-1].weight.mul_(8.0)
    return model.eval()


def clips(batch: int = 6, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(batch, 1, 1, 1, 1, generator=generator))
    return torch.randn(batch, T, *SHAPE, generator=generator) * scale


def convert(model: nn.Module, **options) -> dynify.DynamicModel:
    return dynify.convert(model, "frame-exit", clips(1), options=options).eval()


class FrameCalls:
    """The batch size of every call of the per-frame network the inference loop runs."""

    def __init__(self, dyn: dynify.DynamicModel):
        self.sizes: list[int] = []
        with torch.no_grad():
            network = dyn.frame_network()
        self.handle = network.register_forward_hook(lambda m, i, o: self.sizes.append(len(i[0])))


def test_frames_after_the_exit_are_not_run():
    dyn, x = convert(make()), clips()
    calls = FrameCalls(dyn)
    with torch.no_grad():
        dyn.set_thresholds(0.0)  # everyone leaves after the first frame
        dyn(x)
        assert calls.sizes == [len(x)] and dyn.last_exit.tolist() == [0] * len(x)
        calls.sizes.clear()
        dyn.set_thresholds(NEVER)  # nobody leaves: every frame, the whole batch
        dyn(x)
        assert calls.sizes == [len(x)] * T
        for threshold in (0.5, 0.7, 0.9):
            calls.sizes.clear()
            dyn.set_thresholds(threshold)
            dyn(x)
            frames_seen = dyn.last_exit + 1
            assert sum(calls.sizes) == int(frames_seen.sum())  # one call row per frame seen
            assert calls.sizes == sorted(calls.sizes, reverse=True)  # the batch only shrinks
            assert dyn.last_macs.tolist() == (frames_seen * dyn.frame_macs).tolist()
    assert dyn.frame_macs * T == dyn.static_macs


def test_the_first_frame_looked_at_follows_the_order():
    model, x = make(), clips()
    for order, first in (("strided", 0), ("sequential", 0), ([3, 1, 0, 2], 3)):
        dyn = convert(model, order=order)
        dyn.set_thresholds(0.0)
        with torch.no_grad():
            assert torch.allclose(dyn(x), model.frame(x[:, first]), atol=1e-6)
    dyn = convert(model, order=[2, 0, 3, 1])
    with torch.no_grad():
        means = dyn.exit_logits(x)
        assert torch.allclose(means[1], (model.frame(x[:, 2]) + model.frame(x[:, 0])) / 2)
        assert torch.allclose(means[-1], model(x), atol=1e-6)


def test_frame_orders():
    assert frame_order("strided", 8) == [0, 4, 2, 6, 1, 3, 5, 7]
    assert frame_order("strided", 4) == [0, 2, 1, 3]
    assert sorted(frame_order("strided", 13)) == list(range(13))
    assert frame_order("sequential", 3) == [0, 1, 2]
    assert frame_order([1, 0, 2], 3) == [1, 0, 2]
    with pytest.raises(StrategyError, match="not a permutation"):
        frame_order([0, 0, 1], 3)
    with pytest.raises(StrategyError, match="Unknown frame order"):
        frame_order("random", 3)


@pytest.mark.parametrize("cls", [FlattenClip, ReshapeClip])
def test_the_pattern_is_found_and_static_mode_is_exact(cls):
    model, x = make(cls), clips()
    gm = symbolic_trace(model)
    profile(gm, clips(1))
    pattern = clip_pattern(gm)
    roles = {n.name: n.meta.get(CLIP) for n in gm.graph.nodes}
    assert roles[pattern.fold] == "fold" and roles[pattern.mean] == "time_mean"
    assert roles[pattern.frame_output] == "frame_output" and roles[pattern.unfold] == "unfold"
    assert pattern.frames == T and pattern.frame_shape == SHAPE
    dyn = convert(model)
    with torch.no_grad():
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
        scores = exit_scores(dyn.exit_logits(x)[0], 1.0, "confidence")
        middle = scores.sort().values[len(x) // 2 - 1 : len(x) // 2 + 1]
        dyn.set_thresholds(float(middle.mean()))  # half the clips leave after one frame
        batch, exits = dyn(x), dyn.last_exit.clone()
        alone = torch.cat([dyn(x[i : i + 1]) for i in range(len(x))])
        assert (batch - alone).abs().max() <= 1e-5
        assert len(set(exits.tolist())) >= 2


@pytest.mark.parametrize(
    "cls,match",
    [
        (MaxOverTime, "not a mean over time"),
        (ReadsWholeClip, "also read by"),
        (HeadAfterMean, "not a mean over time"),
    ],
)
def test_other_clip_models_are_refused_with_the_supported_pattern(cls, match):
    with pytest.raises(StrategyError, match=match) as error:
        convert(make(cls))
    assert "frame-exit supports clip models" in str(error.value)


def test_an_image_model_is_refused():
    with pytest.raises(StrategyError, match="frame-exit supports clip models"):
        dynify.convert(make(ImageNet), "frame-exit", torch.randn(1, *SHAPE))


def test_non_finite_frames_exit_at_the_first_exit_switched_on():
    dyn, x = convert(make()), clips()
    x[0, 0] = float("nan")
    x[1] = float("inf")
    with torch.no_grad():
        dyn.set_thresholds([NEVER, 0.99, NEVER])
        dyn(x)
    assert dyn.last_exit[:2].tolist() == [1, 1]
    assert int(dyn.last_macs.max()) <= dyn.worst_case_macs() == dyn.static_macs


def test_calibration_and_evaluation_take_clip_data():
    model, x = make(), clips(48, seed=3)
    with torch.no_grad():
        y = model(x).argmax(-1)
    dyn = convert(model)
    data = TensorDataset(x, y)
    result = dynify.calibrate(dyn, data, max_drop=0.0, part="all")
    assert result.accuracy >= result.static_accuracy
    report = dynify.evaluate(dyn, data)
    assert report.exit_names == ["0", "1", "2", "final"]
    assert report.dynamic_macs_fraction < 1.0


def test_joint_finetuning_trains_the_per_frame_network_on_running_averages():
    model, x = make(), clips(16, seed=4)
    with torch.no_grad():
        y = model(x).argmax(-1)
    dyn = convert(model)
    before = dyn.frame_macs
    weight = next(p for p in dyn.parameters() if p.dim() == 4).detach().clone()
    result = dynify.finetune(
        dyn,
        TensorDataset(x, y),
        mode="joint",
        epochs=1,
        batch_size=8,
        calibration_fraction=0,
        progress=False,
    )
    assert result.history and dyn.frame_macs == before
    assert not torch.equal(weight, next(p for p in dyn.parameters() if p.dim() == 4))
    loss, metrics = dyn.training_loss(x[:4])
    assert loss.requires_grad
    assert {"acc_exit0", "acc_final", "loss"} <= set(metrics)
    with pytest.raises(DynifyError, match="no parameters outside the static network"):
        dynify.finetune(dyn, TensorDataset(x, y), mode="heads", epochs=1, progress=False)


def test_a_mac_cap_holds_for_every_clip_even_non_finite_ones():
    model, x = make(), clips(32, seed=5)
    with torch.no_grad():
        y = model(x).argmax(-1)
    dyn = convert(model)
    dynify.calibrate(dyn, TensorDataset(x, y), mac_cap=0.5, part="all")
    hostile = x.clone()
    hostile[0] = float("nan")
    hostile[1] = 3e38
    with torch.no_grad():
        for xb in (x, hostile, x[:1]):
            dyn(xb)
            assert int(dyn.last_macs.max()) <= 0.5 * dyn.static_macs


def test_inference_runs_the_frame_network_with_batch_norm_folded():
    model = make()
    with torch.no_grad():  # BN statistics away from the identity, so folding changes weights
        bn = model.frame[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    dyn, x = convert(model), clips()
    with torch.no_grad():
        folded = dyn.frame_network()
        assert folded is not dyn.frame and folded is dyn.frame_network()  # cached
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(x[:, 0]), dyn.frame(x[:, 0]), atol=1e-5)
        dyn.set_thresholds(NEVER)
        assert torch.allclose(dyn(x), model(x), atol=1e-5)
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
    assert dyn.frame_network() is dyn.frame  # gradients reach the real parameters
    assert not any("folded" in key for key in dyn.state_dict())
    with torch.no_grad():
        dyn.frame.get_submodule("frame.1").running_mean.add_(0.5)  # rebuilt on change
        refolded = dyn.frame_network()
        assert refolded is not folded
        assert torch.allclose(refolded(x[:, 0]), dyn.frame(x[:, 0]), atol=1e-5)


def test_frames_in_groups_decide_once_per_group_and_skip_the_groups_after_the_exit():
    model = make()
    dyn, x = convert(model, group=2), clips()
    assert dyn.groups == [dyn.order[:2], dyn.order[2:]] and dyn.num_exits == 1
    assert dyn.exit_macs() == [2 * dyn.frame_macs, 4 * dyn.frame_macs]
    assert [row["frames seen"] for row in dyn.describe()] == ["2", "4"]
    calls = FrameCalls(dyn)
    with torch.no_grad():
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
        dyn.set_thresholds(0.0)  # every clip leaves after its first group: 2 frames, 1 call
        out = dyn(x)
        assert calls.sizes == [2 * len(x)] and dyn.last_exit.tolist() == [0] * len(x)
        first = [model.frame(x[:, t]) for t in dyn.order[:2]]
        assert torch.allclose(out, (first[0] + first[1]) / 2, atol=1e-5)
        assert dyn.last_macs.tolist() == [2 * dyn.frame_macs] * len(x)
        scores = exit_scores(dyn.exit_logits(x)[0], 1.0, "confidence").sort().values
        dyn.set_thresholds(float(scores[len(x) // 2 - 1 : len(x) // 2 + 1].mean()))  # half leave
        calls.sizes.clear()
        dyn(x)
        leaving = dyn.last_exit == 0
        assert leaving.any() and not leaving.all()  # mixed, so the second call narrows
        assert calls.sizes == [2 * len(x), 2 * int((~leaving).sum())]
        assert dyn.last_macs.tolist() == (2 * (dyn.last_exit + 1) * dyn.frame_macs).tolist()
        alone = torch.cat([dyn(x[i : i + 1]) for i in range(len(x))])
        assert torch.allclose(dyn(x), alone, atol=1e-5)
        means = dyn.exit_logits(x)
        assert len(means) == 2 and torch.allclose(means[1], model(x), atol=1e-5)


def test_a_group_of_one_is_the_default_and_a_group_must_leave_an_exit():
    dyn = convert(make())
    assert dyn.group == 1 and dyn.groups == [[t] for t in dyn.order] and dyn.num_exits == T - 1
    uneven = convert(make(), group=3)
    assert uneven.groups == [uneven.order[:3], uneven.order[3:]]
    assert uneven.exit_macs() == [3 * uneven.frame_macs, T * uneven.frame_macs]
    for group in (0, T):
        with pytest.raises(StrategyError, match="frames per decision"):
            convert(make(), group=group)


def test_the_folded_network_survives_an_export(tmp_path):
    dyn, x = convert(make()), clips()
    with torch.no_grad():
        before = dyn(x)
        dynify.export_onnx(dyn, tmp_path / "frame_exit.onnx", verify=False)
        assert torch.equal(dyn(x), before)  # eager inference after the export, same tensors
    dynify.bench(dyn, runtime="onnx", runs=1, warmup=0, threads=1)  # exports the static face
    with torch.no_grad():
        assert torch.equal(dyn(x), before)


def test_clips_given_as_a_tensor_pair_are_refused_with_what_to_pass():
    model, x = make(), clips(32, seed=5)
    dyn = convert(model)
    with pytest.raises(DynifyError, match=r"TensorDataset\(clips, labels\)"):
        dynify.calibrate(dyn, (x, torch.zeros(32, dtype=torch.long)), budget=0.5, part="all")
