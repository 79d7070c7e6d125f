"""`dynify finetune` interrupted for real, at exact moments, resumes to bit-identical weights.

Each run is a separate process running the `dynify` CLI (forked from this one, so that the
imports are paid once; one case starts `python -m dynify` itself). The environment variable
DYNIFY_TEST_INTERRUPT makes the process send itself a signal at a named point of the loop:
when a batch is drawn, after its forward pass (batch-norm statistics already updated), right
after `optimizer.step()`, at the batch's end, or while a checkpoint is being written. SIGINT
and SIGTERM must stop the run at the next batch boundary with a checkpoint; SIGKILL kills it
outright, and the last checkpoint written must still resume. In heads, joint and streaming
(images over 64 px, RandomResizedCrop, a model with dropout) modes, the artifact a chain of
interrupted runs ends with equals the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.errors import DynifyError
from dynify.train.run_env import TEST_INTERRUPT_ENV

ROOT = Path(__file__).resolve().parents[1]
STOPPED = 130  # the CLI's exit code after Ctrl-C / SIGTERM
KILLED = -9  # multiprocessing's exit code for SIGKILL

# mode -> (artifact, data folder, CLI options); small: 3 batches an epoch, large: 4.
RUNS = {
    "heads": ("small", ["--mode", "heads", "--batch-size", "8", "--lr", "0.01"]),
    "joint": ("small", ["--mode", "joint", "--batch-size", "8", "--lr", "0.05"]),
    "streaming": ("large", ["--mode", "joint", "--batch-size", "4", "--lr", "0.05"]),
}
COMMON = ["--epochs", "2", "--calibration-fraction", "0", "--seed", "3"]


def _folder(root: Path, size: int, per_class: int, classes: int = 4) -> Path:
    rng = np.random.default_rng(size)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] = 60 * c + 20
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    small = dynify.convert(
        "cifar_resnet20", "early-exit", options={"exits": 2}, weights="random", num_classes=4
    )
    dynify.save(small, root / "small.dyn")
    # mobilenet_v3_small: dropout in its classifier, so joint mode draws random numbers.
    large = dynify.convert(
        "mobilenet_v3_small",
        "early-exit",
        options={"exits": 2},
        weights="random",
        num_classes=4,
        input_size=72,
    )
    dynify.save(large, root / "large.dyn")
    _folder(root / "small_data", 32, per_class=6)  # decoded into memory
    _folder(root / "large_data", 80, per_class=4)  # streamed through a DataLoader
    return root


def _main(args: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    app(args, prog_name="dynify")


@functools.cache
def _runner() -> multiprocessing.context.ForkServerContext:
    """Children forked from a fresh server that has imported dynify once: a fork of the test
    process itself would inherit autograd's worker threads, if an earlier test ran a backward
    pass, and autograd refuses to run in such a child; a spawned child would import torch again
    (several seconds each)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dynify.cli", __name__])
    return context


def _finetune(workspace: Path, mode: str, artifact: Path, *extra: str, interrupt: str = "") -> int:
    """Run `dynify finetune` in a child process; its exit code."""
    name, options = RUNS[mode]
    args = ["finetune", str(artifact), "--data", str(workspace / f"{name}_data")]
    args += [*COMMON, *options, *extra]
    env = {TEST_INTERRUPT_ENV: interrupt} if interrupt else {}
    child = _runner().Process(target=_main, args=(args, env))
    child.start()
    child.join(timeout=300)
    assert child.exitcode is not None, "the run hung"
    return child.exitcode


def _copy(workspace: Path, mode: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(workspace / f"{RUNS[mode][0]}.dyn", folder / "model.dyn"))


_references: dict[str, dict[str, torch.Tensor]] = {}


def _reference(workspace: Path, mode: str) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted run (once per mode)."""
    if mode not in _references:
        artifact = _copy(workspace, mode, workspace / f"reference_{mode}")
        assert _finetune(workspace, mode, artifact) == 0
        _references[mode] = dynify.load(artifact).state_dict()
    return _references[mode]


def _position(checkpoint: Path) -> tuple[int, int, int]:
    state = torch.load(checkpoint, weights_only=True)
    p = state["position"]
    return p["epoch"], p["batch"], p["step"]


def _assert_same_weights(artifact: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = dynify.load(artifact).state_dict()
    assert weights.keys() == reference.keys()
    changed = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert not changed, changed[:5]


def _chain(workspace, tmp_path, mode, interrupts):
    """Interrupt, resume, interrupt... then finish; each step's exit code and position."""
    artifact = _copy(workspace, mode, tmp_path)
    checkpoint = artifact.with_suffix(".ckpt")
    resume: list[str] = []
    for spec, code, position in interrupts:
        assert _finetune(workspace, mode, artifact, *resume, interrupt=spec) == code, spec
        assert _position(checkpoint) == position, spec
        resume = ["--resume"]
    assert _finetune(workspace, mode, artifact, *resume) == 0
    assert not checkpoint.exists()  # removed once the artifact is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.dyn"]  # no temporaries left
    _assert_same_weights(artifact, _reference(workspace, mode))


# (DYNIFY_TEST_INTERRUPT, exit code, checkpoint position (epoch, batch, step) afterwards)
FAST = {
    # Between step() and the counters: the step must not be applied twice. Then SIGKILL while
    # the last epoch-end checkpoint is written: the previous checkpoint stays and resumes.
    "heads": [
        ("after_step:4:SIGTERM", STOPPED, (1, 1, 4)),
        ("checkpoint_write:6:SIGKILL", KILLED, (1, 1, 4)),
    ],
    # SIGTERM while the epoch-end checkpoint is written: the epoch is kept.
    "joint": [("checkpoint_write:3:SIGTERM", STOPPED, (1, 0, 3))],
    # After the forward pass (batch-norm statistics and dropout already drawn) mid-epoch 2.
    "streaming": [("forward:6:SIGINT", STOPPED, (1, 2, 6))],
}


@pytest.mark.parametrize("mode", list(FAST))
def test_interrupted_runs_resume_to_the_uninterrupted_weights(workspace, tmp_path, mode):
    _chain(workspace, tmp_path, mode, FAST[mode])


SLOW = {
    "heads": [
        ("after_step:2:SIGKILL", KILLED, (0, 0, 0)),  # the checkpoint written at the start
        ("batch_start:1:SIGTERM", STOPPED, (0, 1, 1)),
        ("forward:2:SIGINT", STOPPED, (0, 2, 2)),
        ("batch_end:3:SIGINT", STOPPED, (1, 0, 3)),  # the epoch's last batch: epoch end first
        ("checkpoint_write:6:SIGTERM", STOPPED, (2, 0, 6)),  # the last epoch's write
    ],
    "joint": [
        ("after_step:1:SIGTERM", STOPPED, (0, 1, 1)),
        ("forward:3:SIGTERM", STOPPED, (1, 0, 3)),
        ("after_step:5:SIGKILL", KILLED, (1, 0, 3)),
        ("batch_end:4:SIGTERM", STOPPED, (1, 1, 4)),
        ("checkpoint_write:6:SIGKILL", KILLED, (1, 1, 4)),
    ],
    "streaming": [
        ("batch_start:1:SIGINT", STOPPED, (0, 1, 1)),
        ("after_step:2:SIGTERM", STOPPED, (0, 2, 2)),
        ("checkpoint_write:4:SIGTERM", STOPPED, (1, 0, 4)),
        ("after_step:7:SIGKILL", KILLED, (1, 0, 4)),
        ("after_step:7:SIGTERM", STOPPED, (1, 3, 7)),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(SLOW))
def test_more_interrupt_moments_resume_to_the_uninterrupted_weights(workspace, tmp_path, mode):
    _chain(workspace, tmp_path, mode, SLOW[mode])


def test_the_interrupted_batch_is_counted_in_batch_norm_statistics(workspace, tmp_path):
    """A signal after the forward pass lets the batch finish: the checkpoint's batch-norm
    counters equal its step count (they once ran one ahead)."""
    artifact = _copy(workspace, "joint", tmp_path)
    assert _finetune(workspace, "joint", artifact, interrupt="forward:2:SIGTERM") == STOPPED
    state = torch.load(artifact.with_suffix(".ckpt"), weights_only=True)
    counters = {k: int(v) for k, v in state["weights"].items() if k.endswith("num_batches_tracked")}
    assert counters and set(counters.values()) == {state["position"]["step"]} == {2}


def test_python_dash_m_dynify_stops_on_sigterm_and_resumes(workspace, tmp_path):
    """The real entry point: exit code 130, a checkpoint, then --resume completes the run."""
    artifact = _copy(workspace, "heads", tmp_path)
    name, options = RUNS["heads"]
    command = [sys.executable, "-m", "dynify", "finetune", str(artifact)]
    command += ["--data", str(workspace / f"{name}_data"), *COMMON, *options]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env[TEST_INTERRUPT_ENV] = "after_step:2:SIGTERM"
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == STOPPED, run.stderr[-2000:]
    assert "--resume" in run.stdout
    assert _position(artifact.with_suffix(".ckpt")) == (0, 2, 2)
    assert _finetune(workspace, "heads", artifact, "--resume") == 0
    _assert_same_weights(artifact, _reference(workspace, "heads"))


# --- checkpoints of something else -------------------------------------------------------------


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _checkpoint_of(workspace, mode, folder) -> Path:
    artifact = _copy(workspace, mode, folder)
    assert _finetune(workspace, mode, artifact, interrupt="after_step:1:SIGTERM") == STOPPED
    return artifact.with_suffix(".ckpt")


def test_a_checkpoint_of_another_artifact_is_refused(workspace, tmp_path):
    checkpoint = _checkpoint_of(workspace, "heads", tmp_path / "small")
    large = _copy(workspace, "streaming", tmp_path / "large")
    before = large.read_bytes()
    name, options = RUNS["streaming"]
    data = workspace / f"{name}_data"
    result = _invoke(
        "finetune", large, "--data", data, *COMMON, *options, "--checkpoint", checkpoint, "--resume"
    )
    assert result.exit_code == 2, result.output
    assert "another model" in " ".join(result.output.split())
    assert large.read_bytes() == before


def test_a_checkpoint_of_other_weights_of_the_same_architecture_is_refused(workspace, tmp_path):
    checkpoint = _checkpoint_of(workspace, "heads", tmp_path / "a")
    torch.manual_seed(1)  # same architecture, other weights
    other = dynify.convert(
        "cifar_resnet20", "early-exit", options={"exits": 2}, weights="random", num_classes=4
    )
    dynify.save(other, tmp_path / "other.dyn")
    name, options = RUNS["heads"]
    result = _invoke(
        "finetune", tmp_path / "other.dyn", "--data", workspace / f"{name}_data", *COMMON,
        *options, "--checkpoint", checkpoint, "--resume",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "started from other weights" in " ".join(result.output.split())


def test_a_damaged_or_foreign_checkpoint_is_refused(workspace, tmp_path):
    checkpoint = _checkpoint_of(workspace, "heads", tmp_path)
    artifact = checkpoint.with_suffix(".dyn")
    name, options = RUNS["heads"]
    args = ["finetune", artifact, "--data", workspace / f"{name}_data", *COMMON, *options]
    state = torch.load(checkpoint, weights_only=True)
    del state["position"]
    torch.save(state, checkpoint)
    result = _invoke(*args, "--resume")
    assert result.exit_code == 2 and "damaged" in " ".join(result.output.split())
    torch.save({"weights": {}}, checkpoint)
    result = _invoke(*args, "--resume")
    assert result.exit_code == 2 and "not a dynify fine-tuning checkpoint" in result.output
    checkpoint.write_bytes(b"garbage")
    result = _invoke(*args, "--resume")
    assert result.exit_code == 2 and "cannot be read" in result.output


# --- non-finite training --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lr", "inf"], "learning rate"),
        (["--lr", "nan"], "learning rate"),
        (["--std", "nan,1,1"], "std"),
        (["--mean", "0,inf,0"], "mean"),
        (["--lr", "1e30"], "Fine-tuning stopped"),  # finite, but the weights overflow
        (["--std", "1e-38,1e-38,1e-38"], "Fine-tuning stopped"),  # inputs overflow
        (["--lr", "1e30", "--clip-grad-norm", "0", "--warmup", "0.5"], "Fine-tuning stopped"),
        (
            ["--lr", "1e30", "--clip-grad-norm", "0", "--warmup-min-steps", "3"],
            "Fine-tuning stopped",
        ),
        (["--warmup-min-steps", "-1"], "--warmup-min-steps"),
    ],
)
def test_non_finite_training_exits_2_and_keeps_the_artifact(workspace, tmp_path, options, message):
    artifact = _copy(workspace, "heads", tmp_path)
    before = artifact.read_bytes()
    data = workspace / "small_data"
    result = _invoke("finetune", artifact, "--data", data, *COMMON, "--batch-size", "8", *options)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the error panel's borders
    assert message in text
    if message == "Fine-tuning stopped":
        assert "--lr" in text and "--std" in text  # what to try
        assert "--warmup" in text and "--clip-grad-norm" in text
        if "--clip-grad-norm" in options:
            assert "--clip-grad-norm: now off" in text
        if "--warmup" in options:
            assert "warmup: now 0.5" in text
        if "--warmup-min-steps" in options:  # the floor given, capped at half the run
            assert "at least 3 steps (warmup_min_steps, --warmup-min-steps)" in text
    assert artifact.read_bytes() == before


def _tiny(seed: int = 0):
    from tests.conftest import TinyResNet, randomize_bn

    torch.manual_seed(seed)
    model = randomize_bn(TinyResNet())
    return dynify.convert(model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": 2})


@pytest.mark.parametrize("mode", ["heads", "joint"])
def test_a_nan_batch_stops_the_run_with_the_last_finite_weights(mode):
    from dynify.train.distill import finetune

    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # Epoch 0 of seed 0 draws its order from randperm under this seed: sample order[40] is in
    # the third batch of 16.
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    x[order[40]] = float("nan")
    y = torch.arange(64) % 5
    dyn = _tiny()
    after_step = {}

    def record(info):
        after_step[info["step"]] = {k: v.clone() for k, v in dyn.state_dict().items()}

    kwargs = dict(mode=mode, epochs=1, batch_size=16, calibration_fraction=0.0, augment=False)
    with pytest.raises(DynifyError, match=r"stopped at epoch 1, step 3: the loss became nan"):
        finetune(dyn, (x, y), progress=False, callback=record, **kwargs, seed=0)
    last = max(after_step)
    assert last == 2
    for k, v in dyn.state_dict().items():  # weights and batch-norm statistics of the last step
        assert torch.equal(v, after_step[last][k]), k
    assert all(p.requires_grad for p in dyn.parameters())  # restored for the caller


# --- the same moments inside one process (the API) -------------------------------------------

IN_PROCESS = [
    ("batch_start:4:SIGINT", (0, 4, 4)),
    ("forward:4:SIGTERM", (0, 4, 4)),
    ("after_step:4:SIGINT", (0, 4, 4)),
    ("batch_end:6:SIGTERM", (1, 0, 6)),  # the epoch's last batch: its end is recorded first
    ("checkpoint_write:6:SIGTERM", (1, 0, 6)),
]
_api_references: dict[str, dict[str, torch.Tensor]] = {}


def _api_run(mode: str, **kwargs):
    from dynify.train.distill import finetune

    x = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(96) % 5
    dyn = _tiny()
    options = dict(mode=mode, epochs=2, batch_size=16, calibration_fraction=0.0, progress=False)
    result = finetune(dyn, (x, y), **options, **kwargs)
    return dyn, result


def _api_reference(mode: str) -> dict[str, torch.Tensor]:
    if mode not in _api_references:
        _api_references[mode] = _api_run(mode)[0].state_dict()
    return _api_references[mode]


@pytest.mark.parametrize("mode", ["heads", "joint"])
@pytest.mark.parametrize("spec, position", IN_PROCESS)
def test_api_stops_at_a_batch_boundary_and_resumes_exactly(
    tmp_path, monkeypatch, mode, spec, position
):
    from dynify.train.run_env import Interrupted

    checkpoint = tmp_path / "run.ckpt"
    monkeypatch.setenv(TEST_INTERRUPT_ENV, spec)
    with pytest.raises(Interrupted):
        _api_run(mode, checkpoint=checkpoint)
    monkeypatch.delenv(TEST_INTERRUPT_ENV)
    assert _position(checkpoint) == position
    weights = torch.load(checkpoint, weights_only=True)["weights"]
    counters = {int(v) for k, v in weights.items() if k.endswith("num_batches_tracked")}
    if mode == "joint":
        assert counters == {position[2]}  # batch-norm statistics saw exactly the batches done
    dyn, result = _api_run(mode, checkpoint=checkpoint, resume=True)
    assert result.resumed_from == position[0]
    reference = _api_reference(mode)
    for k, v in dyn.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_an_interrupt_raised_inside_the_forward_pass_undoes_the_batch(tmp_path):
    """Not a signal (those only set a flag) but user code raising KeyboardInterrupt mid-batch:
    the batch's batch-norm updates are undone and the checkpoint is at the batch's start."""
    from dynify.train import distill

    calls = {"n": 0}
    original = distill._LossModule.forward

    def forward(self, *args):
        out = original(self, *args)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return out

    checkpoint = tmp_path / "run.ckpt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill._LossModule, "forward", forward)
        with pytest.raises(KeyboardInterrupt):
            _api_run("joint", checkpoint=checkpoint)
    assert _position(checkpoint) == (0, 4, 4)
    weights = torch.load(checkpoint, weights_only=True)["weights"]
    assert {int(v) for k, v in weights.items() if k.endswith("num_batches_tracked")} == {4}
    dyn, _ = _api_run("joint", checkpoint=checkpoint, resume=True)
    reference = _api_reference("joint")
    for k, v in dyn.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_streamed_batches_leave_the_global_random_state_alone(workspace):
    """Streamed augmentation draws from a seed per image: the batches are the same with 0 or 2
    DataLoader workers, skipping batches (as a resume does) gives the rest unchanged, and the
    global generator dropout draws from is not touched."""
    from dynify.train.batches import Batches, Preprocessing, open_data

    dyn = dynify.load(workspace / "large.dyn")
    data = open_data(str(workspace / "large_data"), dyn)
    pre = Preprocessing(72, (0.5,) * 3, (0.25,) * 3)

    def epoch(workers: int, skip: int = 0) -> list[torch.Tensor]:
        batches = Batches(
            data, pre, batch_size=4, train=True, augment=True, seed=1, num_workers=workers
        )
        return [x for x, _ in batches.epoch(1, skip=skip)]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    alone = epoch(0)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(alone) == 4
    assert all(torch.equal(a, b) for a, b in zip(alone, epoch(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(alone[2:], epoch(0, skip=2), strict=True))
    batches = Batches(data, pre, batch_size=4, train=True, augment=True, seed=1)
    assert not torch.equal(next(batches.epoch(2))[0], alone[0])  # another epoch, other crops


@pytest.mark.parametrize(
    "signals, gives_up",
    [((signal.SIGINT, signal.SIGINT), True), ((signal.SIGINT, signal.SIGTERM), False)],
)
def test_a_second_ctrl_c_gives_up_without_a_checkpoint(tmp_path, signals, gives_up):
    """Ctrl-C twice: stop now, keeping the last checkpoint (the run's start). Ctrl-C then
    SIGTERM (what torchrun's workers get) is still one request to stop at the boundary."""
    from dynify.train.run_env import Interrupted

    def send(info):
        if info["step"] == 3:
            for signum in signals:
                os.kill(os.getpid(), signum)

    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt) as stopped:
        _api_run("heads", checkpoint=checkpoint, callback=send)
    assert isinstance(stopped.value, Interrupted) is not gives_up
    assert _position(checkpoint) == ((0, 0, 0) if gives_up else (0, 3, 3))


def test_a_checkpoint_without_a_newer_option_resumes_with_its_default(tmp_path):
    from dataclasses import asdict

    from dynify.train.checkpoint import _check_belongs
    from dynify.train.distill import FinetuneConfig

    config = FinetuneConfig()
    older = {k: v for k, v in asdict(config).items() if k != "clip_grad_norm"}
    model = torch.nn.Linear(2, 2)
    state = {"weights": model.state_dict(), "config": older, "samples": 4, "origin": "o"}
    _check_belongs(tmp_path / "c.pt", state, config, 4, model, "o")  # no error
    changed = FinetuneConfig(clip_grad_norm=1.0)
    with pytest.raises(DynifyError, match="clip_grad_norm"):
        _check_belongs(tmp_path / "c.pt", state, changed, 4, model, "o")
