"""Multi-process fine-tuning: `torchrun` with 2 CPU processes (gloo) finishes, both ranks end
with the same weights, and they equal a single process's run with the same global batch; a stop
signal that reaches one rank stops both at the same batch, and the run resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import dynify
from dynify.train.distill import finetune
from tests.conftest import TinyResNet, randomize_bn

out = Path(sys.argv[1])
resume = sys.argv[2:] == ["resume"]
if os.environ.get("RANK") == "1" and os.environ.get("STOP_RANK_1"):  # only this rank is signalled
    os.environ["DYNIFY_TEST_INTERRUPT"] = os.environ["STOP_RANK_1"]
torch.manual_seed(0)
model = randomize_bn(TinyResNet())
dyn = dynify.convert(model, "early-exit", torch.zeros(1, 3, 16, 16), options={{"exits": 2}})
x = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    y = model(x).argmax(-1)
try:
    result = finetune(dyn, (x, y), epochs=2, batch_size=32, lr=1e-2, seed=0, progress=False,
                      calibration_fraction=0.0, checkpoint=out / "run.ckpt", resume=resume)
except KeyboardInterrupt:
    dist.destroy_process_group()
    sys.exit(130)
rank = dist.get_rank() if dist.is_initialized() else "single"
torch.save({{"weights": dyn.state_dict(), "loss": result.history[-1]["loss"]}},
           out / f"rank{{rank}}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_two_process_torchrun_agrees_with_itself_and_with_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(ddp)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(single)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rank0 = torch.load(ddp / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp / "rank1.pt", weights_only=True)
    alone = torch.load(single / "ranksingle.pt", weights_only=True)
    heads = [k for k in rank0["weights"] if k.startswith("heads.")]
    assert heads
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key  # ranks agree exactly
        # Gradients averaged over two half-batches equal one full batch's, up to rounding.
        assert torch.allclose(value, alone["weights"][key], atol=1e-5, rtol=1e-4), key
    before = torch.zeros_like(rank0["weights"][heads[0]])
    assert not torch.equal(rank0["weights"][heads[0]], before)  # the heads did train
    assert (ddp / "run.ckpt").is_file()  # rank 0 checkpointed
    assert not list(ddp.glob(".*.tmp"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_gloo_backend_is_available_on_cpu():
    assert torch.distributed.is_gloo_available()


def _torchrun(script: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(out), *args]
    return subprocess.run(
        command, env={**_env(), **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_stop_on_one_rank_stops_both_at_one_batch_and_resumes_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    reference, run = tmp_path / "reference", tmp_path / "run"
    reference.mkdir()
    run.mkdir()
    assert _torchrun(script, reference).returncode == 0
    stopped = _torchrun(script, run, STOP_RANK_1="after_step:3:SIGTERM")
    assert stopped.returncode != 0
    assert not list(run.glob("rank*.pt"))  # neither rank went on to finish
    position = torch.load(run / "run.ckpt", weights_only=True)["position"]
    assert (position["epoch"], position["batch"], position["step"]) == (0, 3, 3)
    resumed = _torchrun(script, run, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(reference / "rank0.pt", weights_only=True)["weights"]
    for rank in (0, 1):
        weights = torch.load(run / f"rank{rank}.pt", weights_only=True)["weights"]
        for key, value in expected.items():
            assert torch.equal(weights[key], value), (rank, key)
