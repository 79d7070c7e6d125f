"""dynify's offline first run: convert -> fine-tune -> calibrate -> evaluate, in about a minute.

    python examples/digits.py

No network needed: the data are scikit-learn's handwritten digits (1,797 8x8 images shipped
inside the package), upsampled to 16x16. A small residual CNN is trained from scratch for a few
seconds, converted to an early-exit model, its exit heads are fine-tuned by self-distillation
(backbone frozen), thresholds are calibrated on a held-out part of the training data for half
the static model's MACs, and the result is measured on a test split the model never saw.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn

import dynify

console = Console()


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsNet(nn.Module):
    """A small ResNet for 1x16x16 digits: 16 -> 32 -> 64 channels, two blocks per stage."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.layers = nn.Sequential(
            Block(16, 16), Block(16, 16), Block(16, 32, 2), Block(32, 32),
            Block(32, 64, 2), Block(64, 64),
        )  # fmt: skip
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits(size: int = 16, seed: int = 0):
    """(train, test) pairs of (images [N, 1, size, size] normalised float, labels)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:450], order[450:]
    return (x[train], y[train]), (x[test], y[test])


def train_static(model: nn.Module, x, y, epochs: int, seed: int = 0) -> nn.Module:
    """Plain supervised training from scratch: the 'pretrained static model' of this example."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description="dynify on scikit-learn digits, offline.")
    parser.add_argument("--static-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (heads)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    (x_train, y_train), test = digits()

    console.rule("1. a static model, trained from scratch")
    model = train_static(DigitsNet(), x_train, y_train, args.static_epochs)
    with torch.no_grad():
        static_acc = float((model(test[0]).argmax(-1) == test[1]).float().mean())
    console.print(f"static accuracy on the test split: {static_acc:.2%}")

    console.rule("2. convert: exit heads at 3 cut points")
    dyn = dynify.convert(
        model, "early-exit", torch.zeros(1, 1, 16, 16), options=dynify.EarlyExitOptions(exits=3)
    )
    with torch.no_grad(), dyn.static():
        same = float((dyn(test[0]) - model(test[0])).abs().max())
    console.print(f"inside dyn.static() the output equals the original's (max diff {same:.1e})")

    console.rule("3. fine-tune the heads (self-distillation, backbone frozen)")
    config = dynify.FinetuneConfig(
        mode="heads", epochs=args.epochs, batch_size=64, seed=0, calibration_fraction=0.2
    )
    result = dynify.finetune(dyn, (x_train, y_train), config)
    console.print(f"{result.seconds:.1f} s; last epoch: loss {result.history[-1]['loss']:.3f}")

    console.rule(f"4. calibrate on the held-out part for {args.budget:.0%} of the static MACs")
    # the same data as fine-tuning: calibrate takes the 20 % it held out, never trained on
    cal = dynify.calibrate(dyn, (x_train, y_train), budget=args.budget)
    console.print(
        f"calibrated on {cal.samples} images ({cal.data}); thresholds {cal.thresholds}, "
        f"temperatures {[round(t, 2) for t in cal.temperatures]}; "
        f"calibration accuracy {cal.accuracy:.2%} at {cal.macs_fraction:.3f} of the MACs"
    )

    console.rule("5. evaluate on the test split")
    report = dynify.evaluate(dyn, test)
    console.print(report.table())
    if args.plot:
        console.print(f"plot: {report.plot(args.plot)}")

    with tempfile.TemporaryDirectory() as tmp:
        path = dynify.save(dyn, Path(tmp) / "digits-ee.dyn")
        again = dynify.load(path, model=DigitsNet())
        with torch.no_grad():
            assert torch.equal(again(test[0]), dyn(test[0]))
        console.print(f"saved and reloaded {path.name} ({path.stat().st_size / 1024:.0f} KiB)")
    console.print(
        f"[bold]dynamic: {report.dynamic_accuracy:.2%} at {report.dynamic_macs_fraction:.0%} of "
        f"the MACs; static: {report.static_accuracy:.2%}.[/bold] Done in "
        f"{time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
