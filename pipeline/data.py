"""Data sets, the seeded train/validation split and the data loaders of a COLT run.

Four image-classification sets are supported (``DataConfig.dataset``):

* ``cifar10`` - torchvision's on-disk layout ``<data_dir>/cifar-10-batches-py/`` (the pickled
  batches ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``);
* ``mnist`` / ``fashion_mnist`` - the four standard IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally gzipped) either directly in ``data_dir`` (e.g. ``/work/shared/benchmarks/mnist``
  or Debian's ``/usr/share/datasets/fashion-mnist``) or in torchvision's layout
  ``<data_dir>/MNIST/raw/`` resp. ``<data_dir>/FashionMNIST/raw/``;
* ``digits`` - scikit-learn's bundled 8x8 digits (always available offline).

Files already on disk are read directly (pickle / a small numpy IDX parser) so that one split
can be used without the other (the benchmark MNIST folder holds only the test files) and so
that everything ends up as in-memory uint8 tensors; torchvision's dataset classes
(``CIFAR10``, ``MNIST``, ``FashionMNIST``) are used to *download* missing files into their
usual layout when ``DataConfig.download`` is true. Missing files that cannot be downloaded
raise :class:`DatasetUnavailable`; unreadable files raise :class:`DatasetCorrupt` (both are
:class:`DataError`, a ``RuntimeError``), each with a one-line message.

Every data set yields ``(image, label)`` with ``image`` a float32 tensor of shape ``(C, H, W)``
in **[0, 1] pixel space** (no normalisation: it is the network's first layer, and ε is given in
pixel space) and ``label`` an ``int``.

Typical use::

    from pipeline.config import DataConfig
    from pipeline.data import make_loaders

    loaders = make_loaders(DataConfig(dataset="digits"), batch_size=50, seed=100)
    for x, y in loaders.train: ...          # training set minus the validation split
    for x, y in loaders.valid: ...          # never augmented
    test = loaders.test_loader()            # test files are read only now

``make_loaders(..., use_validation=False)`` trains on the full training set (final run).
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.config import ConfigError, DataConfig

__all__ = [
    "DATASET_INFO",
    "DIGITS_N_TRAIN",
    "VALID_MAX_FRACTION",
    "DataError",
    "DatasetCorrupt",
    "DatasetInfo",
    "DatasetUnavailable",
    "ImageTensorDataset",
    "Loaders",
    "Split",
    "cifar_train_augmentation",
    "effective_n_valid",
    "load_split",
    "make_loaders",
    "read_idx",
    "train_valid_split",
]

SplitName = Literal["train", "test"]


# ---------------------------------------------------------------------------------------------
# Errors


class DataError(RuntimeError):
    """A data set could not be provided (base of the two errors below)."""


class DatasetUnavailable(DataError):
    """The files of a data set are missing and could not (or may not) be downloaded."""


class DatasetCorrupt(DataError):
    """A data file exists but is truncated, malformed or inconsistent."""


# ---------------------------------------------------------------------------------------------
# Constants


@dataclass(frozen=True)
class DatasetInfo:
    """Shape, classes and normalisation constants of a data set (images in [0, 1])."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_train: int
    n_test: int


# digits: a fixed partition of scikit-learn's 1797 images in their bundled order - the first
# 1500 are the training set, the last 297 the test set (no shuffling, so it never changes).
DIGITS_N_TRAIN = 1500
DIGITS_N_TOTAL = 1797

DATASET_INFO: dict[str, DatasetInfo] = {
    # COLT's constants (mean/std per channel).
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10,
                           (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 50_000, 10_000),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), 60_000, 10_000),
    "fashion_mnist": DatasetInfo("fashion_mnist", (1, 28, 28), 10,
                                 (0.1307,), (0.3081,), 60_000, 10_000),
    # Mean and (population, ddof=0) std of all pixels of all 1797 images scaled to [0, 1]
    # (pixels 0..16 divided by 16), rounded to 4 decimals; tests/test_data.py recomputes them.
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (0.3053,), (0.3760,),
                          DIGITS_N_TRAIN, DIGITS_N_TOTAL - DIGITS_N_TRAIN),
}

# A validation split may take at most this fraction of the training set (see effective_n_valid).
VALID_MAX_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------
# In-memory data set


class ImageTensorDataset(Dataset):
    """Images kept in memory as an integer tensor (N, C, H, W), labels as int64 (N,).

    Item ``i`` is ``(images[i].float() / scale, int(labels[i]))``, then ``transform`` (if any)
    applied to the float tensor. Keeping uint8 in memory is 4x smaller than float32 and avoids
    the per-item PIL round trip of torchvision's dataset classes.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float, name: str = "",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match "
                             f"{images.shape[0]} images")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = float(scale)
        self.name = name
        self.transform = transform

    def with_transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None
                       ) -> ImageTensorDataset:
        """A view sharing the same tensors with another transform (e.g. augmented training)."""
        return ImageTensorDataset(self.images, self.labels, self.scale, self.name, transform)

    @property
    def targets(self) -> torch.Tensor:
        """The labels (torchvision's attribute name)."""
        return self.labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32).div_(self.scale)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        # Batched fetch (used by DataLoader and Subset): one gather and one conversion per
        # batch instead of one per image.
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[idx].to(torch.float32).div_(self.scale)
        labels = self.labels[idx].tolist()
        if self.transform is None:
            return list(zip(images.unbind(0), labels))
        return [(self.transform(img), lab) for img, lab in zip(images.unbind(0), labels)]

    def __repr__(self) -> str:
        return (f"ImageTensorDataset({self.name!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, transform={self.transform})")


def cifar_train_augmentation() -> Callable[[torch.Tensor], torch.Tensor]:
    """COLT's CIFAR-10 training augmentation on (3, 32, 32) tensors: zero-padded crop + flip.

    The randomness comes from torch's RNG: the global one with ``num_workers=0`` (seed it with
    ``torch.manual_seed``), per-worker seeds derived from the loader's generator otherwise.
    """
    from torchvision import transforms

    return transforms.Compose([transforms.RandomCrop(32, padding=4),
                               transforms.RandomHorizontalFlip()])


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped if its name ends in .gz); errors raise DatasetCorrupt.

    Format: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then the data in C order. The file must hold exactly that many bytes.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DatasetCorrupt(f"{path}: corrupt or truncated gzip file ({err}); "
                             "delete it and download/copy it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() or "empty"
        raise DatasetCorrupt(f"{path}: not an IDX file (bad magic number {magic}); "
                             "delete it and download/copy it again")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorrupt(f"{path}: truncated IDX header; delete it and download/copy it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetCorrupt(f"{path}: IDX file {what}: header says shape {dims} "
                             f"({expected} bytes), file has {len(raw)} bytes; "
                             "delete it and download/copy it again")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # Native byte order and writable, so torch.from_numpy accepts it.
    return array.astype(dtype.newbyteorder("="), copy=True)


_IDX_PREFIX = {"train": "train", "test": "t10k"}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _idx_names(split: SplitName) -> tuple[str, str]:
    prefix = _IDX_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx_file(folder: Path, name: str) -> Path | None:
    # Uncompressed first (torchvision extracts), then gzipped; also the common variant with a
    # dot before "idx" (e.g. Kaggle's train-images.idx3-ubyte).
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _idx_folders(dataset: str, data_dir: Path) -> list[Path]:
    return [data_dir, data_dir / _TORCHVISION_CLASS[dataset] / "raw"]


def _load_idx_split(dataset: str, data_dir: Path, split: SplitName) -> ImageTensorDataset | None:
    """The split read from the first folder holding both its IDX files, or None if none does."""
    image_name, label_name = _idx_names(split)
    for folder in _idx_folders(dataset, data_dir):
        image_path = _find_idx_file(folder, image_name)
        label_path = _find_idx_file(folder, label_name)
        if image_path is None or label_path is None:
            continue
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DatasetCorrupt(f"{image_path}: expected uint8 images of shape (N, 28, 28), "
                                 f"got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
            raise DatasetCorrupt(f"{label_path}: expected {images.shape[0]} uint8 labels "
                                 f"(one per image in {image_path.name}), got {labels.dtype} "
                                 f"{labels.shape}")
        if labels.size and labels.max() >= 10:
            raise DatasetCorrupt(f"{label_path}: label {int(labels.max())} out of range 0..9")
        return ImageTensorDataset(torch.from_numpy(images).unsqueeze(1),
                                  torch.from_numpy(labels.astype(np.int64)), 255.0,
                                  f"{dataset}/{split}")
    return None


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickled batches

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with path.open("rb") as fh:
            # latin1: the official batches are Python 2 pickles (torchvision does the same).
            entry = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as err:
        raise DatasetCorrupt(f"{path}: unreadable CIFAR-10 batch ({type(err).__name__}: {err}); "
                             "delete the folder and download it again") from None
    if not isinstance(entry, dict):
        raise DatasetCorrupt(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    # Keys are str in the official files read with latin1, bytes if written by Python 3.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DatasetCorrupt(f"{path}: 'data' must be a uint8 array of shape (N, 3072), "
                             f"got {desc}")
    if labels is None or len(labels) != data.shape[0]:
        raise DatasetCorrupt(f"{path}: expected {data.shape[0]} 'labels', "
                             f"got {None if labels is None else len(labels)}")
    labels = [int(v) for v in labels]
    if labels and not 0 <= min(labels) <= max(labels) < 10:
        raise DatasetCorrupt(f"{path}: labels out of range 0..9")
    return data, labels


def _load_cifar_split(data_dir: Path, split: SplitName) -> ImageTensorDataset | None:
    folder = data_dir / _CIFAR_FOLDER
    paths = [folder / name for name in _CIFAR_FILES[split]]
    if not all(p.is_file() for p in paths):
        return None
    batches = [_read_cifar_batch(p) for p in paths]
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major: already CHW.
    images = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[1], dtype=np.int64) for b in batches])
    return ImageTensorDataset(torch.from_numpy(images), torch.from_numpy(labels), 255.0,
                              f"cifar10/{split}")


# ---------------------------------------------------------------------------------------------
# Download via torchvision, and the "unavailable" message

# What a failed torchvision download raises: URLError/HTTPError/socket errors are OSError,
# md5 mismatches and MNIST's all-mirrors-failed are RuntimeError, broken archives the others.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, tarfile.TarError, zlib.error)


def _expected_files(dataset: str, data_dir: Path, split: SplitName) -> str:
    if dataset == "cifar10":
        return f"{', '.join(_CIFAR_FILES[split])} in {data_dir / _CIFAR_FOLDER}"
    names = " and ".join(f"{n}[.gz]" for n in _idx_names(split))
    folders = " or ".join(str(f) for f in _idx_folders(dataset, data_dir))
    return f"{names} in {folders}"


def _unavailable(dataset: str, data_dir: Path, split: SplitName, reason: str,
                 tried_download: bool) -> DatasetUnavailable:
    hint = ""
    if dataset == "fashion_mnist":
        hint = (" (on Debian: apt-get install dataset-fashion-mnist and "
                "--set data.data_dir=/usr/share/datasets/fashion-mnist)")
    # One line: torchvision's messages may span several.
    reason = " ".join(reason.split())
    retry = ("or retry with network access" if tried_download
             else "or --set data.download=true (needs network access)")
    return DatasetUnavailable(
        f"{dataset} {split} split unavailable: expected "
        f"{_expected_files(dataset, data_dir, split)}; {reason}; "
        f"fix: --set data.data_dir=DIR (a folder holding these files){hint}, {retry}")


def _download(dataset: str, data_dir: Path, split: SplitName) -> ImageTensorDataset:
    """Download with torchvision's dataset class into its usual layout, then read it."""
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST}[dataset]
    try:
        tv = cls(root=str(data_dir), train=(split == "train"), download=True)
    except _DOWNLOAD_ERRORS as err:
        raise _unavailable(dataset, data_dir, split,
                           f"download failed ({type(err).__name__}: {err})",
                           tried_download=True) from err
    if dataset == "cifar10":
        images = torch.from_numpy(np.ascontiguousarray(tv.data.transpose(0, 3, 1, 2)))  # HWC->CHW
        labels = torch.as_tensor(tv.targets, dtype=torch.int64)
    else:
        images, labels = tv.data.unsqueeze(1).contiguous(), tv.targets.to(torch.int64)
    return ImageTensorDataset(images, labels, 255.0, f"{dataset}/{split}")


# ---------------------------------------------------------------------------------------------
# Public loading API


def _load_digits(split: SplitName) -> ImageTensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are integers 0..16: store them exactly as uint8 and divide by 16 on access.
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    part = slice(0, DIGITS_N_TRAIN) if split == "train" else slice(DIGITS_N_TRAIN, None)
    return ImageTensorDataset(images[part].contiguous(), labels[part].contiguous(), 16.0,
                              f"digits/{split}")


def load_split(cfg: DataConfig, split: SplitName) -> ImageTensorDataset:
    """One split of ``cfg.dataset`` as an in-memory data set of ((C,H,W) floats in [0,1], int).

    Files on disk are used when present (see the module docstring for the folders searched);
    otherwise, if ``cfg.download``, torchvision downloads them into ``cfg.data_dir``. Raises
    DatasetUnavailable (missing, download off or failed) or DatasetCorrupt (unreadable file).
    No augmentation and no normalisation are applied.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split = {split!r}: allowed train, test")
    if cfg.dataset == "digits":
        return _load_digits(split)
    data_dir = Path(cfg.data_dir).expanduser()
    if cfg.dataset == "cifar10":
        found = _load_cifar_split(data_dir, split)
    else:
        found = _load_idx_split(cfg.dataset, data_dir, split)
    if found is not None:
        return found
    if not cfg.download:
        raise _unavailable(cfg.dataset, data_dir, split, "files not found and download is off",
                           tried_download=False)
    return _download(cfg.dataset, data_dir, split)


def split_on_disk(cfg: DataConfig, split: SplitName) -> bool:
    """Whether the files of ``split`` are where :func:`load_split` looks (nothing is read), so a
    command can find a missing data set before it starts any work."""
    if cfg.dataset == "digits":
        return True  # bundled with scikit-learn
    data_dir = Path(cfg.data_dir).expanduser()
    if cfg.dataset == "cifar10":
        return all((data_dir / _CIFAR_FOLDER / name).is_file() for name in _CIFAR_FILES[split])
    return any(all(_find_idx_file(folder, name) is not None for name in _idx_names(split))
               for folder in _idx_folders(cfg.dataset, data_dir))


# ---------------------------------------------------------------------------------------------
# Train/validation split


@dataclass(frozen=True)
class Split:
    """A seeded partition of range(n) into training and validation indices.

    ``valid_indices`` are the first ``n_valid`` entries of ``default_rng(seed).permutation(n)``
    and ``train_indices`` the rest, both in that (random) order, so any prefix of the validation
    set is itself a random sample. ``hash`` (16 hex chars) identifies the exact split: the first
    16 hex digits of the sha256 of ``n_valid``, then the validation indices, then the training
    indices, all as little-endian int64 bytes. (Without the ``n_valid`` prefix the bytes would
    be just the permutation, the same for every validation size.)
    """

    train_indices: tuple[int, ...]
    valid_indices: tuple[int, ...]
    seed: int
    hash: str

    @property
    def n_train(self) -> int:
        return len(self.train_indices)

    @property
    def n_valid(self) -> int:
        return len(self.valid_indices)


def train_valid_split(n: int, n_valid: int, seed: int) -> Split:
    """Deterministic split of ``n`` items into ``n - n_valid`` training and ``n_valid`` validation.

    Uses its own ``numpy.random.default_rng(seed)``, so torch's and numpy's global RNG states
    neither affect it nor are affected.
    """
    if n < 0 or not 0 <= n_valid <= n:
        raise ValueError(f"train_valid_split: need 0 <= n_valid <= n, "
                         f"got n={n}, n_valid={n_valid}")
    perm = np.random.default_rng(seed).permutation(n).astype("<i8")
    size = np.asarray([n_valid], dtype="<i8").tobytes()
    digest = sha256(size + perm[:n_valid].tobytes() + perm[n_valid:].tobytes()).hexdigest()[:16]
    return Split(train_indices=tuple(perm[n_valid:].tolist()),
                 valid_indices=tuple(perm[:n_valid].tolist()), seed=seed, hash=digest)


def effective_n_valid(dataset: str | int | Sized, n_valid: int) -> int:
    """The validation size actually used: ``min(n_valid, floor(0.2 * n_train))``.

    ``dataset`` is a data set name (its nominal ``DATASET_INFO[...].n_train``), a training set
    size, or the training data set itself. The cap keeps at least 80% of a small training set
    for training: digits (1500 images) turns the default 5000 into 300, while CIFAR-10
    (50,000) and MNIST (60,000) keep 5000.
    """
    if n_valid < 0:
        raise ValueError(f"n_valid = {n_valid}: must be >= 0")
    if isinstance(dataset, str):
        if dataset not in DATASET_INFO:
            raise ValueError(f"unknown data set {dataset!r}: allowed {', '.join(DATASET_INFO)}")
        n_train = DATASET_INFO[dataset].n_train
    elif isinstance(dataset, int):
        n_train = dataset
    else:
        n_train = len(dataset)
    return min(n_valid, int(VALID_MAX_FRACTION * n_train))


# ---------------------------------------------------------------------------------------------
# Loaders


@dataclass
class Loaders:
    """The loaders of one run. ``test`` / ``test_loader()`` read the test split on first use."""

    train: DataLoader
    valid: DataLoader | None
    split: Split | None
    info: DatasetInfo
    _test_factory: Callable[[], DataLoader] = field(repr=False)
    _test_cache: DataLoader | None = field(default=None, repr=False)

    def test_loader(self) -> DataLoader:
        """The test loader, created (and its files read) on the first call, then cached."""
        if self._test_cache is None:
            self._test_cache = self._test_factory()
        return self._test_cache

    @property
    def test(self) -> DataLoader:
        return self.test_loader()


def make_loaders(cfg: DataConfig, batch_size: int, seed: int, *, use_validation: bool = True,
                 test_batch_size: int | None = None,
                 device: str | torch.device | None = None) -> Loaders:
    """Training, validation and (lazy) test loaders for ``cfg``.

    With ``use_validation`` the training loader covers the training set minus the seeded
    validation split (``cfg.split_seed``, size ``effective_n_valid``); the validation loader is
    None when that size is 0. Without it (final training) the full training set is used and
    ``valid``/``split`` are None. The training loader shuffles with a ``torch.Generator``
    seeded from ``seed`` and drops the last incomplete batch (as COLT); validation and test
    loaders keep the order and every item. CIFAR-10 training images are augmented (unless
    ``cfg.augment`` is false); validation and test images never are. For a CUDA ``device``
    the loaders pin memory (so ``.to(device, non_blocking=True)`` overlaps) and, when
    ``cfg.num_workers`` is 0, use ``CUDA_LOADER_WORKERS`` worker processes (persistent).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    info = DATASET_INFO[cfg.dataset]
    eval_batch = test_batch_size or batch_size
    base = load_split(cfg, "train")
    augment = cifar_train_augmentation() if cfg.dataset == "cifar10" and cfg.augment else None
    # The augmented view shares the tensors; validation is built from the un-augmented base.
    train_view = base.with_transform(augment) if augment is not None else base

    split: Split | None = None
    valid_loader: DataLoader | None = None
    if use_validation:
        split = train_valid_split(len(base), effective_n_valid(base, cfg.n_valid), cfg.split_seed)
        train_indices = list(split.train_indices)
        if cfg.max_train_images:
            # The indices are in shuffled order, so a prefix is a seeded random subset.
            train_indices = train_indices[: cfg.max_train_images]
        train_set: Dataset = Subset(train_view, train_indices)
        if split.n_valid:
            valid_loader = _loader(Subset(base, list(split.valid_indices)), eval_batch, cfg)
    else:
        train_set = train_view
    if len(train_set) < batch_size:
        # drop_last would silently yield no batch at all.
        raise ConfigError(f"batch_size = {batch_size}: larger than the {len(train_set)} "
                          f"training images of {cfg.dataset}")

    opts = _loader_options(cfg, device)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=generator, **opts)
    if valid_loader is not None and opts["pin_memory"]:
        valid_loader = _loader(valid_loader.dataset, eval_batch, cfg, device)

    def test_factory() -> DataLoader:
        return _loader(load_split(cfg, "test"), eval_batch, cfg, device)

    return Loaders(train=train_loader, valid=valid_loader, split=split, info=info,
                   _test_factory=test_factory)


# Loader worker processes on CUDA when the config leaves num_workers at 0 (CPU runs keep 0: the
# tensors are in memory already and workers would compete with the training threads).
CUDA_LOADER_WORKERS = 4


def _loader_options(cfg: DataConfig, device: str | torch.device | None) -> dict[str, Any]:
    cuda = device is not None and torch.device(device).type == "cuda"
    workers = cfg.num_workers or (min(CUDA_LOADER_WORKERS, os.cpu_count() or 1) if cuda else 0)
    return {"num_workers": workers, "pin_memory": cuda,
            "persistent_workers": cuda and workers > 0}


def _loader(dataset: Dataset, batch_size: int, cfg: DataConfig,
            device: str | torch.device | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                      **_loader_options(cfg, device))
