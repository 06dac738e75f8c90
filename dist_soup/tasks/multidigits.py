"""``multidigits``: two handwritten digits on one canvas, one classifier head per question.

Data (no download: scikit-learn ships the 1,797 8x8 digits of ``load_digits``). The images are
split once, by ``seed``, into a train pool and a test pool (``test_fraction`` of the images), so
test canvases show digit images never seen in training. Example i pairs a left image a and a
right image b of its pool; the canvas is 8 x (16 - overlap): a occupies columns 0..7, b columns
8-overlap .. 15-overlap, and where they overlap the ink is ``max(a, b)``. Pixels are scaled to
[0, 1], then Gaussian noise of std ``noise`` is added.

Objectives (cross-entropy, metric accuracy, higher is better), any ordered subset of:
``left`` (10 classes), ``right`` (10), ``sum`` (left + right, 19 classes), ``parity``
((left + right) mod 2). Default ``("left", "right")``. Groups: ``digits`` (left/right present)
and ``derived`` (sum/parity present), a partition of the objectives.

Model: ``trunk`` (the shared part, ``Task.shared == "trunk"``) = conv3x3(1->c) ReLU,
conv3x3 stride 2 (c->2c) ReLU, flatten, linear -> ``hidden`` ReLU; ``heads[name]`` = one linear
layer per objective. ``model(x)`` returns a dict of logits, so one forward call serves all
objectives (as DDP requires).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _check_indices, _check_int, _check_real, _lookup_baselines, _seeded_init
from .base import Metric, Task

_CLASSES = {"left": 10, "right": 10, "sum": 19, "parity": 2}

# Single-task baselines: test accuracy of each objective trained alone. Keys: the options that
# differ from their defaults (``seed``, ``objectives`` and ``eval_batch`` aside), as sorted
# (name, value) pairs. Measured 2026-11-21 on the 2-core CPU dev machine (torch 2.13.0, 1 thread) by
#   python benchmarks/task_baselines.py --task multidigits --joint --option objectives=[left,right,sum,parity]
# protocol (the quickstart's budget): build_model(s), Adam lr 3e-3, 200 steps of batch 32 drawn
# with replacement, only that objective's loss back-propagated, mean over model seeds s = 0, 1, 2
# (data seed 0). Per seed: left 0.931 0.930 0.934; right 0.942 0.932 0.906; sum 0.197 0.181
# 0.194; parity 0.630 0.836 0.794. The equal-weight sum of all four under the same protocol
# scored left 0.921, right 0.887, sum 0.247, parity 0.656: Delta_m% -2.7.
BASELINES: dict[tuple, dict[str, float]] = {
    (): {"left": 0.9317, "right": 0.9267, "sum": 0.1907, "parity": 0.7533},
}
# The plain sum of the losses (``ew``) as the project trains it: configs/quickstart.yaml with
# task multidigits (default options: objectives left, right), recipe vs, solver ew, selection
# all (200 steps, 2 processes x batch 16, Adam 3e-3, QSGD 4-bit allgather), mean over seeds 0, 1,
# 2; the ``multidigits+ew`` cell of benchmarks/specs/recipes.yaml, measured 2026-12-02 (torch
# 2.13.0 CPU, 2-core VM). Per seed: left 0.900 0.891 0.920; right 0.925 0.934 0.922. Keys as in
# BASELINES, but ``objectives`` counts (the sum depends on which losses it adds).
EW_REFERENCE: dict[tuple, dict[str, float]] = {
    (): {"left": 0.9037, "right": 0.927},
}
_DIGIT_OBJECTIVES = ("left", "right")


@dataclass
class DigitsBatch:
    """``x``: (B, 1, 8, W) canvases; ``targets``: (B, K) class ids, column k = objective k."""

    x: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> DigitsBatch:
        return DigitsBatch(self.x.to(device), self.targets.to(device))

    def __len__(self) -> int:
        return self.x.shape[0]


class DigitsNet(nn.Module):
    """Shared conv trunk plus one linear head per objective; ``forward`` returns all logits."""

    def __init__(self, width: int, objectives: tuple[str, ...], channels: int, hidden: int):
        super().__init__()
        half = (width + 1) // 2  # columns after the stride-2 conv (padding 1, kernel 3)
        self.trunk = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * half, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, _CLASSES[k]) for k in objectives})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {k: head(z) for k, head in self.heads.items()}


class MultiDigits(Task):
    """Two overlaid scikit-learn digits; classify the left one, the right one, and derived labels.

    Options (all keyword): ``seed`` (data: image split and pairing) = 0, ``objectives`` =
    ("left", "right"), ``n_train`` = 6000, ``n_test`` = 1000 canvases, ``overlap`` = 3 columns
    (0..7), ``noise`` = 0.1, ``test_fraction`` = 0.3 of the images, ``channels`` = 8,
    ``hidden`` = 64, ``eval_batch`` = 1000.
    """

    name = "multidigits"
    shared = "trunk"

    @property
    def baselines(self) -> dict[str, float]:
        """Single-task test accuracies of this task's objectives, from ``BASELINES``.

        Stored for the default data and model options (any ``seed``, ``objectives`` and
        ``eval_batch``: an objective trained alone does not see the others); empty for other
        options, where the numbers would not apply: measure them with
        ``benchmarks/task_baselines.py --task multidigits --option KEY=VALUE``.
        """
        return _lookup_baselines(self, BASELINES, {"seed", "objectives", "eval_batch"})

    @property
    def ew_reference(self) -> dict[str, float]:
        """Test accuracies of the plain sum of losses at the quickstart's budget, from
        ``EW_REFERENCE`` (stored for the default options, objectives included)."""
        return _lookup_baselines(self, EW_REFERENCE, {"seed", "eval_batch"})

    def __init__(
        self,
        *,
        seed: int = 0,
        objectives: tuple[str, ...] | list[str] = _DIGIT_OBJECTIVES,
        n_train: int = 6000,
        n_test: int = 1000,
        overlap: int = 3,
        noise: float = 0.1,
        test_fraction: float = 0.3,
        channels: int = 8,
        hidden: int = 64,
        eval_batch: int = 1000,
    ):
        self.seed = _check_int("seed", seed, 0)
        objectives = tuple(objectives) if isinstance(objectives, (list, tuple)) else objectives
        if not isinstance(objectives, tuple) or not objectives:
            raise ValueError(
                f"multidigits: objectives must be a non-empty list of names from {sorted(_CLASSES)}, got {objectives!r}"
            )
        bad = [k for k in objectives if k not in _CLASSES]
        if bad or len(set(objectives)) != len(objectives):
            raise ValueError(
                f"multidigits: objectives must be distinct names from {sorted(_CLASSES)}, got {list(objectives)}"
            )
        self.objectives = objectives
        digits = tuple(k for k in objectives if k in _DIGIT_OBJECTIVES)
        derived = tuple(k for k in objectives if k not in _DIGIT_OBJECTIVES)
        self.groups = {g: ks for g, ks in (("digits", digits), ("derived", derived)) if ks}
        self.metrics = {k: Metric("accuracy", higher_is_better=True) for k in objectives}
        self.n_train = _check_int("n_train", n_train, 1)
        self.n_test = _check_int("n_test", n_test, 1)
        self.overlap = _check_int("overlap", overlap, 0, 7)
        self.noise = _check_real("noise", noise, 0.0)
        self.test_fraction = _check_real("test_fraction", test_fraction, 0.05, 0.95)
        self.channels = _check_int("channels", channels, 1)
        self.hidden = _check_int("hidden", hidden, 1)
        self.eval_batch = _check_int("eval_batch", eval_batch, 1)
        self.width = 16 - self.overlap

        from sklearn.datasets import load_digits  # bundled with scikit-learn, read from disk

        data = load_digits()
        images = (data.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
        labels = data.target.astype(np.int64)
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(len(labels))
        n_test_img = int(round(self.test_fraction * len(labels)))
        test_pool, train_pool = perm[:n_test_img], perm[n_test_img:]
        self._train = self._make(rng, images, labels, train_pool, self.n_train)
        self._test = self._make(rng, images, labels, test_pool, self.n_test)

    def _make(
        self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int
    ) -> DigitsBatch:
        a = rng.choice(pool, size=n)
        b = rng.choice(pool, size=n)
        canvas = np.zeros((n, 8, self.width), dtype=np.float32)
        canvas[:, :, :8] = images[a]
        start = 8 - self.overlap
        canvas[:, :, start:] = np.maximum(canvas[:, :, start:], images[b])
        if self.noise > 0:
            canvas += rng.normal(0.0, self.noise, size=canvas.shape).astype(np.float32)
        la, lb = labels[a], labels[b]
        columns = {"left": la, "right": lb, "sum": la + lb, "parity": (la + lb) % 2}
        targets = np.stack([columns[k] for k in self.objectives], axis=1)
        return DigitsBatch(torch.from_numpy(canvas).unsqueeze(1), torch.from_numpy(targets))

    def build_model(self, seed: int) -> DigitsNet:
        return _seeded_init(seed, lambda: DigitsNet(self.width, self.objectives, self.channels, self.hidden))

    def train_size(self) -> int:
        return self.n_train

    def batch(self, indices: torch.Tensor) -> DigitsBatch:
        idx = _check_indices(indices, self.n_train)
        return DigitsBatch(self._train.x[idx], self._train.targets[idx])

    def losses(self, model: nn.Module, batch: DigitsBatch) -> dict[str, torch.Tensor]:
        out = model(batch.x)
        return {k: F.cross_entropy(out[k], batch.targets[:, i]) for i, k in enumerate(self.objectives)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        correct = torch.zeros(len(self.objectives), dtype=torch.long)
        try:
            for lo in range(0, self.n_test, self.eval_batch):
                part = DigitsBatch(
                    self._test.x[lo : lo + self.eval_batch], self._test.targets[lo : lo + self.eval_batch]
                ).to(device)
                out = model(part.x)
                for i, k in enumerate(self.objectives):
                    correct[i] += int((out[k].argmax(dim=1) == part.targets[:, i]).sum())
        finally:
            model.train(was_training)
        return {k: correct[i].item() / self.n_test for i, k in enumerate(self.objectives)}
