"""Tests of pipeline.data: split, digits, CIFAR-10 batch format, IDX files, offline errors."""

from __future__ import annotations

import gzip
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import (
    DATASET_INFO,
    DatasetCorrupt,
    DatasetUnavailable,
    ImageTensorDataset,
    Split,
    effective_n_valid,
    load_split,
    make_loaders,
    read_idx,
    train_valid_split,
)

MNIST_BENCH = Path("/work/shared/benchmarks/mnist")
FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Split


def test_split_deterministic_disjoint_and_complete() -> None:
    a, b = train_valid_split(1000, 200, seed=3), train_valid_split(1000, 200, seed=3)
    assert isinstance(a, Split) and a == b and a.hash == b.hash
    assert (a.n_train, a.n_valid) == (800, 200)
    assert not set(a.train_indices) & set(a.valid_indices)
    assert sorted(a.train_indices + a.valid_indices) == list(range(1000))
    assert len(a.hash) == 16 and int(a.hash, 16) >= 0
    c = train_valid_split(1000, 200, seed=4)
    assert c.valid_indices != a.valid_indices and c.hash != a.hash
    # Another size gives another hash too (valid + train alone is the same permutation).
    assert train_valid_split(1000, 201, seed=3).hash != a.hash


def test_split_hash_is_sha256_of_valid_then_train() -> None:
    import hashlib

    s = train_valid_split(50, 10, seed=0)
    data = np.asarray((10, *s.valid_indices, *s.train_indices), dtype="<i8").tobytes()
    assert s.hash == hashlib.sha256(data).hexdigest()[:16]
    perm = np.random.default_rng(0).permutation(50)
    assert s.valid_indices == tuple(perm[:10].tolist())


def test_split_independent_of_global_rngs() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    a = train_valid_split(500, 100, seed=7)
    torch.manual_seed(2)
    np.random.seed(2)
    state = torch.get_rng_state()
    b = train_valid_split(500, 100, seed=7)
    assert a == b and torch.equal(state, torch.get_rng_state())


def test_split_sizes_and_errors() -> None:
    assert train_valid_split(10, 0, seed=0).n_valid == 0
    assert train_valid_split(10, 10, seed=0).n_train == 0
    with pytest.raises(ValueError):
        train_valid_split(10, 11, seed=0)
    with pytest.raises(ValueError):
        train_valid_split(10, -1, seed=0)


def test_effective_n_valid_rule() -> None:
    assert effective_n_valid("digits", 5000) == 300  # 20% of 1500
    assert effective_n_valid("digits", 100) == 100
    assert effective_n_valid("cifar10", 5000) == 5000
    assert effective_n_valid("mnist", 5000) == 5000
    assert effective_n_valid(1000, 5000) == 200
    assert effective_n_valid(list(range(50)), 5000) == 10
    with pytest.raises(ValueError):
        effective_n_valid("imagenet", 10)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_offline_shapes_ranges_labels() -> None:
    cfg = DataConfig(dataset="digits", data_dir="/nonexistent", download=False)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (1500, 297)
    info = DATASET_INFO["digits"]
    assert (info.n_train, info.n_test) == (1500, 297)
    x, y = train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == info.input_shape and isinstance(y, int)
    assert float(train.images.max()) / train.scale == 1.0 and int(train.images.min()) == 0
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # The partition is the bundled order: first 1500 / last 297.
    from sklearn.datasets import load_digits

    d = load_digits()
    assert torch.allclose(test[0][0][0], torch.from_numpy(d.images[1500] / 16.0).float())
    assert test[296][1] == int(d.target[-1])


def test_digits_constants_match_data() -> None:
    from sklearn.datasets import load_digits

    pixels = load_digits().images / 16.0
    info = DATASET_INFO["digits"]
    assert info.mean == (round(float(pixels.mean()), 4),)
    assert info.std == (round(float(pixels.std()), 4),)


def test_colt_constants() -> None:
    c = DATASET_INFO["cifar10"]
    assert c.mean == (0.4914, 0.4822, 0.4465) and c.std == (0.2023, 0.1994, 0.2010)
    assert c.input_shape == (3, 32, 32)
    for name in ("mnist", "fashion_mnist"):
        info = DATASET_INFO[name]
        assert info.mean == (0.1307,) and info.std == (0.3081,) and info.input_shape == (1, 28, 28)


def test_digits_loaders() -> None:
    cfg = DataConfig(dataset="digits")
    loaders = make_loaders(cfg, batch_size=64, seed=100)
    assert loaders.split is not None and loaders.split.n_valid == 300
    train_idx = set(loaders.train.dataset.indices)
    valid_idx = set(loaders.valid.dataset.indices)
    assert not train_idx & valid_idx and len(train_idx | valid_idx) == 1500
    batches = list(loaders.train)
    assert len(batches) == 1200 // 64 and all(b[0].shape == (64, 1, 8, 8) for b in batches)
    assert batches[0][1].dtype == torch.int64
    assert sum(len(b[1]) for b in loaders.valid) == 300
    assert sum(len(b[1]) for b in loaders.test_loader()) == 297
    assert loaders.test is loaders.test_loader()
    # Reproducible shuffling from the seed, different with another seed.
    again = make_loaders(cfg, batch_size=64, seed=100)
    other = make_loaders(cfg, batch_size=64, seed=101)
    assert torch.equal(next(iter(again.train))[1], batches[0][1])
    assert not torch.equal(next(iter(other.train))[1], batches[0][1])
    # Final training: the full training set, no validation.
    full = make_loaders(cfg, batch_size=64, seed=100, use_validation=False)
    assert full.valid is None and full.split is None and len(full.train.dataset) == 1500


def test_loaders_batch_size_too_large() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(DataConfig(dataset="digits"), batch_size=5000, seed=0)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's pickled-batch layout


def _write_cifar(root: Path, n_per_batch: int = 20,
                 with_test: bool = True) -> dict[str, np.ndarray]:
    """A tiny cifar-10-batches-py folder in the real format; returns the data per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + (["test_batch"] if with_test else [])
    for name in names:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with (folder / name).open("wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, fh)
        written[name] = data
        written[name + ":labels"] = np.asarray(labels)
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                      b"dog", b"frog", b"horse", b"ship", b"truck"],
                     b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, fh)
    return written


def test_cifar_pixels_and_labels(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (100, 20)
    # Row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major -> image[c, h, w].
    raw = written["data_batch_2"][3]
    x, y = train[20 + 3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    for c, h, w in [(0, 0, 0), (0, 0, 1), (1, 5, 7), (2, 31, 30), (2, 31, 31)]:
        assert x[c, h, w].item() == pytest.approx(raw[c * 1024 + h * 32 + w] / 255.0)
    assert y == int(written["data_batch_2:labels"][3])
    assert torch.equal(test.labels, torch.from_numpy(written["test_batch:labels"]))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_cifar_str_keys_accepted(tmp_path: Path) -> None:
    # The official (Python 2) files come out with str keys when read with latin1.
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with path.open("rb") as fh:
        entry = pickle.load(fh)
    with path.open("wb") as fh:
        pickle.dump({k.decode(): v for k, v in entry.items()}, fh, protocol=2)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False)
    assert torch.equal(load_split(cfg, "test").images.reshape(20, -1),
                       torch.from_numpy(entry[b"data"]))


def test_cifar_matches_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our reader and torchvision's CIFAR10 agree on the same folder (md5s patched to ours)."""
    import hashlib

    import torchvision.datasets as tvd

    _write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    # torchvision reads with latin1 and str keys, as in the official files.
    for path in folder.iterdir():
        with path.open("rb") as fh:
            entry = pickle.load(fh)
        with path.open("wb") as fh:
            pickle.dump({k.decode(): v for k, v in entry.items()}, fh)

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")]
                                                    for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": md5("batches.meta")})
    tv = tvd.CIFAR10(root=str(tmp_path), train=True, download=False)
    ours = load_split(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), "train")
    assert torch.equal(ours.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2))
    assert ours.labels.tolist() == tv.targets


def test_cifar_augmentation_train_only(tmp_path: Path) -> None:
    _write_cifar(tmp_path, with_test=False)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False, n_valid=20)
    torch.manual_seed(0)
    loaders = make_loaders(cfg, batch_size=10, seed=1)
    base = load_split(cfg, "train")
    assert loaders.split.n_valid == 20 and len(loaders.train.dataset) == 80
    train_set = loaders.train.dataset
    # Training images: shifted/flipped crops of the originals, so most differ from them ...
    changed = 0
    for i in range(40):
        x, y = train_set[i]
        orig, y0 = base[train_set.indices[i]]
        assert y == y0 and x.shape == (3, 32, 32)
        changed += not torch.equal(x, orig)
    assert changed >= 30
    # ... while validation images are exactly the originals, every time.
    for _ in range(2):
        xs, ys = next(iter(loaders.valid))
        idx = list(loaders.split.valid_indices[:10])
        assert torch.equal(xs, torch.stack([base[i][0] for i in idx]))
        assert ys.tolist() == [base[i][1] for i in idx]
    # augment=False: training images are untouched.
    plain = make_loaders(DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False,
                                    n_valid=20, augment=False), batch_size=10, seed=1)
    for i in range(10):
        assert torch.equal(plain.train.dataset[i][0], base[plain.train.dataset.indices[i]][0])
    # No test_batch in this folder: only the lazy test loader fails.
    with pytest.raises(DatasetUnavailable, match="test_batch"):
        loaders.test_loader()


def test_cifar_corrupt_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetCorrupt, match="data_batch_3"):
        load_split(cfg, "train")


# ---------------------------------------------------------------------------------------------
# IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.tobytes()


def _write_mnist(folder: Path, prefix: str, n: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(_idx_bytes(arr))
        else:
            (folder / name).write_bytes(_idx_bytes(arr))
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_plain_and_torchvision_layouts(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_mnist(tmp_path / "MNIST" / "raw", "train", 30, gz)
    t_images, _ = _write_mnist(tmp_path / "plain", "t10k", 12, gz)
    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False)
    train = load_split(cfg, "train")
    assert isinstance(train, ImageTensorDataset) and len(train) == 30
    x, y = train[4]
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x[0], torch.from_numpy(images[4] / 255.0).float())
    assert y == int(labels[4])
    test = load_split(DataConfig(dataset="mnist", data_dir=str(tmp_path / "plain"),
                                 download=False), "test")
    assert torch.equal(test.images[:, 0], torch.from_numpy(t_images))


def test_read_idx_roundtrip_and_bigendian(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    path = tmp_path / "x-idx3"
    path.write_bytes(bytes([0, 0, 0x0C, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes())
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.tolist() == arr.tolist()


@pytest.mark.parametrize("damage", ["truncated", "bad_magic", "trailing", "bad_gzip", "empty"])
def test_corrupt_idx_is_clear_error(tmp_path: Path, damage: str) -> None:
    images, labels = _write_mnist(tmp_path, "t10k", 8, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[:-100])
    elif damage == "bad_magic":
        path.write_bytes(b"\x12\x34" + raw[2:])
    elif damage == "trailing":
        path.write_bytes(raw + b"\0")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-30])
    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetCorrupt, match="t10k-images-idx3-ubyte") as info:
        load_split(cfg, "test")
    assert "\n" not in str(info.value)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 8, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(7, dtype=np.uint8)))
    with pytest.raises(DatasetCorrupt, match="labels"):
        load_split(DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False), "test")


def test_mnist_benchmark_test_split() -> None:
    if not MNIST_BENCH.is_dir():
        pytest.skip(f"{MNIST_BENCH} not present on this machine")
    cfg = DataConfig(dataset="mnist", data_dir=str(MNIST_BENCH), download=False)
    test = load_split(cfg, "test")
    assert len(test) == 10_000 and test.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                    974, 1009]
    x, _ = test[0]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    # The folder holds only the test files.
    with pytest.raises(DatasetUnavailable, match=str(MNIST_BENCH)):
        load_split(cfg, "train")


def test_fashion_mnist_debian_package() -> None:
    if not FASHION_DEB.is_dir():
        pytest.fail(f"{FASHION_DEB} is missing: run `apt-get install dataset-fashion-mnist`")
    cfg = DataConfig(dataset="fashion_mnist", data_dir=str(FASHION_DEB), download=False)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------
# Offline behaviour


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL torchvision opens fails as offline; the list records the attempts."""
    attempts: list[str] = []

    def urlopen(request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        attempts.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return attempts


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "fashion_mnist"])
def test_missing_with_download_offline(tmp_path: Path, no_network: list[str],
                                       dataset: str) -> None:
    folder = tmp_path / "nothing-here"
    cfg = DataConfig(dataset=dataset, data_dir=str(folder), download=True)
    with pytest.raises(DatasetUnavailable) as info:
        load_split(cfg, "train")
    message = str(info.value)
    assert no_network, "a download should have been attempted"
    assert str(folder) in message and "download failed" in message and "data.data_dir" in message
    assert "retry with network access" in message
    assert "\n" not in message
    assert ("data_batch_1" if dataset == "cifar10" else "train-images-idx3-ubyte") in message
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "fashion_mnist"])
def test_missing_without_download(tmp_path: Path, no_network: list[str], dataset: str) -> None:
    folder = tmp_path / "nothing-here"
    cfg = DataConfig(dataset=dataset, data_dir=str(folder), download=False)
    with pytest.raises(DatasetUnavailable) as info:
        load_split(cfg, "test")
    message = str(info.value)
    assert not no_network, "download=False must not touch the network"
    assert str(folder) in message and "download is off" in message and "\n" not in message
    assert "data.download=true" in message
    assert ("test_batch" if dataset == "cifar10" else "t10k-images-idx3-ubyte") in message
    if dataset == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message
