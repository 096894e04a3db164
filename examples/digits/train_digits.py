"""Train and export the small real CNN shipped with hqpc (``examples/digits``).

The model is a tiny MobileNetV3-flavoured image classifier trained on
scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``:
1797 grayscale 8x8 images with values 0..16, labels 0..9).  It is small
enough to be committed to the repository (< 1 MB) yet contains every
structure the compiler's passes are meant to handle:

* unfolded inference-mode ``BatchNormalization`` nodes (work for BN folding),
* ``HardSwish`` activations,
* a depthwise ``Conv`` (``group == channels``),
* squeeze-and-excitation blocks
  (``GlobalAveragePool -> Conv 1x1 -> Relu -> Conv 1x1 -> HardSigmoid -> Mul``),
* residual ``Add`` nodes,
* a ``Dropout`` before the classifier (it vanishes in the eval-mode export),
* a final ``Gemm`` classifier with 10 outputs.

Preprocessing (fixed, documented here and applied once; ``digits.npz``
stores the result, i.e. exactly the tensor the model consumes):

1. ``v`` (8x8, 0..16) is scaled to the photo range: ``v / 16 * 255``.
2. The 8x8 image is upsampled to 32x32 with bilinear interpolation
   (``torch.nn.functional.interpolate``, ``align_corners=False``), then
   rounded and clipped to ``uint8`` 0..255, like a decoded photo.
3. The gray channel is replicated to 3 channels (NCHW, ``3x32x32``).
4. ``x_model = (x_uint8 / 255 - 0.5) / 0.5`` for every channel
   (mean 0.5, std 0.5), so values lie in [-1, 1].

Split: the 1797 images are shuffled with ``numpy.random.default_rng(0)``;
the first 1397 are used for training, the last 400 are held out.  The
held-out images are written to ``digits.npz`` (``x`` float32 N x 3 x 32 x 32,
``y`` int64) together with ``digits.toml``, the data spec used by
``hqpc`` (calibration 150 / evaluation 250 images).

Outputs (next to this script):

* ``digits_cnn.onnx`` -- opset 17, IR version 8, input ``input``
  float32 ``[N, 3, 32, 32]`` (dynamic ``N``), output ``logits`` ``[N, 10]``.
* ``digits.npz`` and ``digits.toml`` -- the held-out data and its spec.

After the export the script checks with onnxruntime that the ONNX outputs
match torch within 1e-4 on the held-out set and prints both accuracies.

Regenerate with::

    python examples/digits/train_digits.py

Requires torch (only this script does; the rest of hqpc never imports it).
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent

SEED = 0
NUM_TRAIN = 1397
NUM_HELD_OUT = 400
IMAGE_SIZE = 32
NUM_CLASSES = 10
NORM_MEAN = 0.5
NORM_STD = 0.5

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 accepts IR <= 13; onnx >= 1.23 defaults to 14

DATA_SPEC_TOML = """\
[data]
npz = "digits.npz"
[split]
seed = 0
calib = 150
eval = 250
"""


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def digits_to_uint8_images(images_8x8: np.ndarray) -> np.ndarray:
    """Turn ``load_digits`` images (N x 8 x 8, 0..16) into N x 3 x 32 x 32 uint8.

    Values are scaled to 0..255, bilinearly upsampled to 32x32, rounded to
    uint8 and the gray channel is replicated to three channels.
    """
    scaled = torch.from_numpy(images_8x8.astype(np.float32) / 16.0 * 255.0)
    upsampled = F.interpolate(
        scaled[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    gray = torch.round(upsampled).clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(gray, 3, axis=1)


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    """Map uint8 images to the model's input: ``(x / 255 - mean) / std``, float32."""
    x = images_uint8.astype(np.float32) / 255.0
    return ((x - NORM_MEAN) / NORM_STD).astype(np.float32)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_held_out, y_held_out)``, preprocessed.

    The permutation comes from ``numpy.random.default_rng(SEED)`` so the split
    is identical on every run.
    """
    digits = load_digits()
    x_all = normalise(digits_to_uint8_images(digits.images))
    y_all = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y_all))
    assert len(order) == NUM_TRAIN + NUM_HELD_OUT
    train_idx, held_idx = order[:NUM_TRAIN], order[NUM_TRAIN:]
    return x_all[train_idx], y_all[train_idx], x_all[held_idx], y_all[held_idx]


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class ConvBnAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional HardSwish."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act:
            layers.append(nn.Hardswish())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """SE block: GAP -> 1x1 Conv -> ReLU -> 1x1 Conv -> HardSigmoid -> Mul."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block: expand 1x1 -> depthwise 3x3 -> SE -> project 1x1, + skip."""

    def __init__(self, channels: int, expansion: int, se_reduction: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = ConvBnAct(channels, hidden, kernel=1)
        self.depthwise = ConvBnAct(hidden, hidden, kernel=3, groups=hidden)
        self.se = SqueezeExcite(hidden, hidden // se_reduction)
        self.project = ConvBnAct(hidden, channels, kernel=1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class DigitsCNN(nn.Module):
    """Small MobileNetV3-like classifier for 3x32x32 inputs (about 60 k parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBnAct(3, 16, stride=1),     # 16 x 32 x 32
            ConvBnAct(16, 32, stride=2),    # 32 x 16 x 16
            InvertedResidual(32, expansion=2),
            ConvBnAct(32, 64, stride=2),    # 64 x 8 x 8
            InvertedResidual(64, expansion=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(self.dropout(x))


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch and make torch's CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order -> bitwise reproducible on a given machine


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int = 64,
          lr: float = 3e-3) -> None:
    """Train ``model`` with AdamW + cosine schedule on the given arrays."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(y) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total_loss = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_t[idx]), y_t[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  train loss {total_loss / len(y):.4f}")


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Eval-mode logits for ``x`` as a numpy array."""
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------
# Export / verification
# --------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: Path) -> onnx.ModelProto:
    """Export with the TorchScript exporter keeping BatchNormalization unfolded.

    ``do_constant_folding=False`` skips the exporter's eval peephole pass,
    which would otherwise fuse every BatchNormalization into its Conv.
    """
    model.eval()
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with warnings.catch_warnings():
        # The legacy exporter is deliberate (the dynamo one needs onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=False,
        )
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    proto.producer_name = "hqpc examples/digits/train_digits.py"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def verify_onnx(path: Path, x: np.ndarray, y: np.ndarray, torch_logits: np.ndarray) -> float:
    """Compare onnxruntime with torch on ``x``; return the onnxruntime accuracy."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(["logits"], {"input": x})
    max_diff = float(np.max(np.abs(ort_logits - torch_logits)))
    print(f"max |onnxruntime - torch| on held-out set: {max_diff:.3g}")
    if max_diff > 1e-4:
        raise SystemExit(f"ONNX export mismatch: max abs diff {max_diff} > 1e-4")
    ort_pred = ort_logits.argmax(1)
    if not np.array_equal(ort_pred, torch_logits.argmax(1)):
        raise SystemExit("ONNX export mismatch: predictions differ from torch")
    return float((ort_pred == y).mean())


def main() -> None:
    """Train, export, write the data files and verify."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(SEED)
    x_train, y_train, x_held, y_held = load_split()
    print(f"train {x_train.shape}  held-out {x_held.shape}  "
          f"input range [{x_held.min():.2f}, {x_held.max():.2f}]")

    model = DigitsCNN()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {num_params}")
    train(model, x_train, y_train, epochs=args.epochs)

    torch_logits = predict_logits(model, x_held)
    torch_acc = float((torch_logits.argmax(1) == y_held).mean())
    print(f"torch held-out accuracy: {torch_acc:.4f} ({NUM_HELD_OUT} images)")

    onnx_path = out_dir / "digits_cnn.onnx"
    proto = export_onnx(model, onnx_path)
    op_counts = Counter(node.op_type for node in proto.graph.node)
    print("ONNX ops:", dict(sorted(op_counts.items())))
    if op_counts["BatchNormalization"] == 0:
        raise SystemExit("exported graph lost its BatchNormalization nodes")

    ort_acc = verify_onnx(onnx_path, x_held, y_held, torch_logits)
    print(f"onnxruntime held-out accuracy: {ort_acc:.4f} ({NUM_HELD_OUT} images)")

    np.savez_compressed(out_dir / "digits.npz", x=x_held, y=y_held)
    (out_dir / "digits.toml").write_text(DATA_SPEC_TOML)
    for name in ("digits_cnn.onnx", "digits.npz", "digits.toml"):
        print(f"wrote {out_dir / name} ({(out_dir / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
