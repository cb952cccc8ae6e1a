"""Datasets: IDX files, discovery and download, loading, synthetic data, partitions."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import amble.data
from amble.data import (
    PARTITION_KINDS,
    find_idx_root,
    load_dataset,
    make_synthetic,
    partition_indices,
    read_idx,
    write_idx,
)
from amble.data import idx as idx_module
from amble.errors import DataError

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test touches the network, the user's cache or the user's AMBLE_DATA_DIR."""
    monkeypatch.setenv("AMBLE_OFFLINE", "1")
    monkeypatch.delenv("AMBLE_DATA_DIR", raising=False)
    cache_home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home


def write_mnist_like(folder: Path, num_train: int = 20, num_test: int = 10, *, gz: bool = True) -> None:
    """Write four MNIST-format files: even samples all black (0), odd samples all white (255).

    Train pixels are then half 0.0 and half 1.0 after scaling: mean 0.5, std 0.5, so normalised
    pixels are exactly -1.0 (black) and +1.0 (white). Labels are ``index % 10``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        images[1::2] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(count) % 10).astype(np.uint8))


# --------------------------------------------------------------------------- public API


def test_public_api_is_pinned() -> None:
    # Prepare
    expected = {
        "DATASET_NAMES",
        "PARTITION_KINDS",
        "Dataset",
        "find_idx_root",
        "load_dataset",
        "make_synthetic",
        "partition_indices",
        "split_for",
        "read_idx",
        "write_idx",
    }

    # Execute
    exported = set(amble.data.__all__)

    # Assert
    assert exported == expected
    assert amble.data.DATASET_NAMES == ("fashion-mnist", "mnist", "cifar10", "synthetic")
    assert PARTITION_KINDS == ("iid", "shards", "dirichlet", "quantity", "natural")


# --------------------------------------------------------------------------- IDX read / write


@pytest.mark.parametrize(
    ("dtype", "file_name"),
    [(np.uint8, "a.idx"), (np.int16, "b.idx.gz"), (np.int32, "c.idx"), (np.float32, "d.idx.gz")],
)
def test_write_then_read_idx_round_trips(tmp_path: Path, dtype: type[np.generic], file_name: str) -> None:
    # Prepare
    array = np.array([[1, 2, 3], [4, 5, 127]], dtype=dtype)

    # Execute
    write_idx(tmp_path / file_name, array)
    loaded = read_idx(tmp_path / file_name)

    # Assert
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.shape == (2, 3)
    np.testing.assert_array_equal(loaded, array)


def test_idx_header_is_big_endian_with_magic(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "labels.idx"

    # Execute
    write_idx(path, np.array([7, 8], dtype=np.int16))

    # Assert: 00 00, dtype 0x0B (int16), 1 dim; size 2; values 7 and 8 as big-endian int16
    assert path.read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0, 7, 0, 8])


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_generated_idx_files(tmp_path: Path, gz: bool) -> None:
    # Prepare
    write_mnist_like(tmp_path / "mnist-files", num_train=20, num_test=10, gz=gz)

    # Execute
    dataset = load_dataset("mnist", root=str(tmp_path / "mnist-files"))

    # Assert
    assert dataset.name == "mnist"
    assert dataset.num_classes == 10
    assert dataset.input_shape == (1, 28, 28)
    assert dataset.x_train.shape == (20, 1, 28, 28)
    assert dataset.x_test.shape == (10, 1, 28, 28)
    assert dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64
    assert dataset.y_train.tolist() == [i % 10 for i in range(20)]
    assert dataset.x_train[0].eq(-1.0).all()
    assert dataset.x_train[1].eq(1.0).all()
    assert dataset.x_test[3].eq(1.0).all()


def test_truncated_idx_file_raises_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])

    # Execute
    with pytest.raises(DataError) as caught:
        read_idx(path)

    # Assert
    assert str(path) in str(caught.value)
    assert "truncated" in str(caught.value)


def test_truncated_gzip_raises_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, (np.arange(1000) % 10).astype(np.uint8))
    path.write_bytes(path.read_bytes()[:30])

    # Execute
    with pytest.raises(DataError) as caught:
        read_idx(path)

    # Assert
    assert str(path) in str(caught.value)


def test_bad_magic_raises_naming_the_file(tmp_path: Path) -> None:
    # Prepare: a PNG signature where the IDX magic should be
    path = tmp_path / "not-idx.gz"
    path.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(100)))

    # Execute
    with pytest.raises(DataError) as caught:
        read_idx(path)

    # Assert
    assert str(path) in str(caught.value)
    assert "magic" in str(caught.value)


def test_unknown_dtype_code_is_rejected(tmp_path: Path) -> None:
    # Prepare: dtype code 0x0A does not exist in IDX
    path = tmp_path / "odd.idx"
    path.write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]))

    # Execute / Assert
    with pytest.raises(DataError, match="dtype code 0x0A"):
        read_idx(path)


def test_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "files"
    write_mnist_like(folder, num_train=20)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", root=str(folder))

    # Assert
    assert "20 images" in str(caught.value)
    assert "19 labels" in str(caught.value)
    assert "train-labels-idx1-ubyte.gz" in str(caught.value)


# --------------------------------------------------------------------------- discovery


def test_discovery_finds_files_directly_in_amble_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    write_mnist_like(tmp_path / "data")
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "data"))

    # Execute
    found = find_idx_root("mnist", "auto")

    # Assert
    assert found == tmp_path / "data"


def test_discovery_finds_named_subfolder_of_amble_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    write_mnist_like(tmp_path / "data" / "mnist")
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "data"))

    # Execute
    found = find_idx_root("mnist", None)

    # Assert
    assert found == tmp_path / "data" / "mnist"


def test_discovery_finds_the_download_cache(offline: Path) -> None:
    # Prepare
    write_mnist_like(offline / "amble" / "datasets" / "mnist")

    # Execute
    found = find_idx_root("mnist")

    # Assert
    assert found == offline / "amble" / "datasets" / "mnist"


def test_explicit_root_wins_over_amble_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    write_mnist_like(tmp_path / "env")
    write_mnist_like(tmp_path / "explicit")
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "env"))

    # Execute
    found = find_idx_root("mnist", str(tmp_path / "explicit"))

    # Assert
    assert found == tmp_path / "explicit"


def test_missing_explicit_root_fails_even_if_another_copy_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    write_mnist_like(tmp_path / "env")
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "env"))
    wrong = tmp_path / "typo"

    # Execute
    with pytest.raises(DataError) as caught:
        find_idx_root("mnist", str(wrong))

    # Assert
    assert str(wrong) in str(caught.value)
    assert "data.root" in str(caught.value)


def test_offline_not_found_says_where_it_looked_and_how_to_fix(offline: Path) -> None:
    # Execute
    with pytest.raises(DataError) as caught:
        find_idx_root("mnist")

    # Assert
    message = str(caught.value)
    assert str(offline / "amble" / "datasets" / "mnist") in message
    assert "AMBLE_DATA_DIR" in message
    assert "data.root" in message
    assert "AMBLE_OFFLINE" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_offline_fashion_mnist_not_found_suggests_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare: pretend the Debian package is not installed
    missing_system_dir = tmp_path / "usr-share-datasets-fashion-mnist"
    source = dataclasses.replace(idx_module.IDX_SOURCES["fashion-mnist"], system_dirs=(missing_system_dir,))
    monkeypatch.setitem(idx_module.IDX_SOURCES, "fashion-mnist", source)

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("fashion-mnist")

    # Assert
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(missing_system_dir) in message
    assert "AMBLE_DATA_DIR" in message


def test_unknown_dataset_lists_allowed_names() -> None:
    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("imagenet")

    # Assert
    assert "'imagenet'" in str(caught.value)
    assert "fashion-mnist, mnist, cifar10, synthetic" in str(caught.value)


def _use_mirror(monkeypatch: pytest.MonkeyPatch, base_url: str, md5: dict[str, str]) -> None:
    source = dataclasses.replace(idx_module.IDX_SOURCES["mnist"], base_url=base_url, md5=md5)
    monkeypatch.setitem(idx_module.IDX_SOURCES, "mnist", source)
    monkeypatch.delenv("AMBLE_OFFLINE")


def test_download_fills_the_cache_and_loads(
    mirror: tuple[str, Path], offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    base_url, folder = mirror
    write_mnist_like(folder, num_train=20, num_test=10)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    _use_mirror(monkeypatch, base_url, md5)

    # Execute
    dataset = load_dataset("mnist")

    # Assert
    cache = offline / "amble" / "datasets" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{stem}.gz" for stem in STEMS)
    assert dataset.x_train.shape == (20, 1, 28, 28)
    assert dataset.y_test.tolist() == list(range(10))


def test_download_with_wrong_checksum_leaves_nothing_behind(
    mirror: tuple[str, Path], offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    base_url, folder = mirror
    write_mnist_like(folder)
    _use_mirror(monkeypatch, base_url, {f"{stem}.gz": "0" * 32 for stem in STEMS})

    # Execute
    with pytest.raises(DataError) as caught:
        find_idx_root("mnist")

    # Assert
    assert "md5" in str(caught.value)
    assert "AMBLE_DATA_DIR" in str(caught.value)
    assert list((offline / "amble" / "datasets" / "mnist").iterdir()) == []


def test_failed_download_lists_places_and_the_url(
    mirror: tuple[str, Path], offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the mirror is empty, so every request is a 404
    base_url, _ = mirror
    _use_mirror(monkeypatch, base_url, {})

    # Execute
    with pytest.raises(DataError) as caught:
        find_idx_root("mnist")

    # Assert
    message = str(caught.value)
    assert "404" in message
    assert f"{base_url}train-images-idx3-ubyte.gz" in message
    assert str(offline / "amble" / "datasets" / "mnist") in message


# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(
    not FASHION_SYSTEM_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist_is_found_and_loaded() -> None:
    # Execute
    dataset = load_dataset("fashion-mnist")

    # Assert
    assert dataset.x_train.shape == (60000, 1, 28, 28)
    assert dataset.x_test.shape == (10000, 1, 28, 28)
    assert dataset.num_classes == 10
    assert torch.bincount(dataset.y_train).tolist() == [6000] * 10
    assert abs(float(dataset.x_train.mean())) < 1e-3
    assert abs(float(dataset.x_train.std()) - 1.0) < 1e-3


# --------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_shapes_and_balance() -> None:
    # Execute
    dataset = make_synthetic(num_train=60, num_test=30, num_classes=3, shape=(2, 5, 4), seed=1)

    # Assert
    assert dataset.name == "synthetic"
    assert dataset.input_shape == (2, 5, 4)
    assert dataset.x_train.shape == (60, 2, 5, 4)
    assert dataset.x_test.shape == (30, 2, 5, 4)
    assert dataset.num_classes == 3
    assert torch.bincount(dataset.y_train).tolist() == [20, 20, 20]
    assert torch.bincount(dataset.y_test).tolist() == [10, 10, 10]


def test_synthetic_is_deterministic_per_seed() -> None:
    # Execute
    first, again, other = make_synthetic(seed=3), load_dataset("synthetic", seed=3), make_synthetic(seed=4)

    # Assert
    assert torch.equal(first.x_train, again.x_train)
    assert torch.equal(first.y_train, again.y_train)
    assert not torch.equal(first.x_train, other.x_train)


def test_synthetic_size_comes_from_the_config() -> None:
    # Setup
    from amble.config import ConfigError, config_from_dict

    config = config_from_dict({"data": {"dataset": "synthetic", "synthetic_size": [300, 40]}})

    # Execute
    dataset = load_dataset("synthetic", seed=1, synthetic_size=config.data.synthetic_size)

    # Assert
    assert (len(dataset.y_train), len(dataset.y_test)) == (300, 40)
    with pytest.raises(ConfigError, match="synthetic_size"):
        config_from_dict({"data": {"synthetic_size": [0, 40]}})


def test_synthetic_is_learnable_in_a_few_steps() -> None:
    # Prepare
    dataset = make_synthetic(num_train=500, num_test=200, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(28 * 28, dataset.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = dataset.x_train.flatten(1), dataset.y_train
    with torch.no_grad():
        initial_loss = float(torch.nn.functional.cross_entropy(model(inputs), targets))

    # Execute
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()

    # Assert: loss starts near ln(10) = 2.3 and at least halves; test accuracy far above chance (0.1)
    with torch.no_grad():
        final_loss = float(torch.nn.functional.cross_entropy(model(inputs), targets))
        accuracy = float((model(dataset.x_test.flatten(1)).argmax(1) == dataset.y_test).float().mean())
    assert final_loss < 0.5 * initial_loss
    assert accuracy > 0.6


def test_synthetic_rejects_bad_arguments() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="num_classes"):
        make_synthetic(num_classes=1)


# --------------------------------------------------------------------------- partitions


def _labels_sorted_100() -> np.ndarray:
    """100 samples, 10 of each label 0..9, sorted by label."""
    return np.repeat(np.arange(10), 10)


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_partition_is_disjoint_and_covers_all_samples(kind: str) -> None:
    # Prepare
    labels = np.random.default_rng(0).integers(0, 10, size=200)
    owners = np.arange(200) % 10  # read by the natural partition only: ten users of 20 samples each

    # Execute
    parts = partition_indices(labels, 10, kind, seed=0, owners=owners)

    # Assert
    assert len(parts) == 10
    combined = np.concatenate(parts)
    assert len(combined) == 200
    assert set(combined.tolist()) == set(range(200))
    assert all(part.dtype == np.int64 for part in parts)


def test_iid_splits_near_equally() -> None:
    # Execute
    parts = partition_indices(np.zeros(10, dtype=np.int64), 3, "iid", seed=0)

    # Assert
    assert [len(part) for part in parts] == [4, 3, 3]


@pytest.mark.parametrize("shuffled", [False, True])
def test_shards_give_at_most_two_labels_per_device(shuffled: bool) -> None:
    # Prepare: 20 shards of 5 samples; once sorted by label each shard lies within one label
    labels = _labels_sorted_100()
    if shuffled:
        labels = np.random.default_rng(7).permutation(labels)

    # Execute
    parts = partition_indices(labels, 10, "shards", seed=0, shards_per_device=2)

    # Assert
    assert [len(part) for part in parts] == [10] * 10
    assert all(len(np.unique(labels[part])) <= 2 for part in parts)
    assert any(len(np.unique(labels[part])) == 2 for part in parts)


def test_shards_are_deterministic_per_seed() -> None:
    # Execute
    first = partition_indices(_labels_sorted_100(), 10, "shards", seed=5)
    again = partition_indices(_labels_sorted_100(), 10, "shards", seed=5)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_dirichlet_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    # Prepare
    labels = _labels_sorted_100()

    # Execute
    first = partition_indices(labels, 5, "dirichlet", seed=1, alpha=0.5)
    again = partition_indices(labels, 5, "dirichlet", seed=1, alpha=0.5)
    other = partition_indices(labels, 5, "dirichlet", seed=2, alpha=0.5)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not() -> None:
    # Prepare
    labels = np.repeat(np.arange(10), 100)

    # Execute
    skewed = partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.05)
    uniform = partition_indices(labels, 10, "dirichlet", seed=0, alpha=1000.0)

    # Assert: with alpha=1000 every device holds every label; with 0.05 most devices miss some
    assert all(len(np.unique(labels[part])) == 10 for part in uniform)
    assert np.mean([len(np.unique(labels[part])) for part in skewed]) < 6


def test_dirichlet_respects_min_samples() -> None:
    # Prepare
    labels = np.repeat(np.arange(10), 20)

    # Execute
    parts = partition_indices(labels, 20, "dirichlet", seed=0, alpha=0.3, min_samples=5)

    # Assert
    assert min(len(part) for part in parts) >= 5


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    # Prepare: 60 samples over 50 devices with extreme skew almost never leaves every device non-empty
    labels = np.repeat(np.arange(3), 20)

    # Execute
    with pytest.raises(DataError) as caught:
        partition_indices(labels, 50, "dirichlet", seed=0, alpha=0.001)

    # Assert
    assert "raise alpha" in str(caught.value)


def test_quantity_sizes_are_unequal_and_respect_min_samples() -> None:
    # Prepare
    labels = np.zeros(1000, dtype=np.int64)

    # Execute
    parts = partition_indices(labels, 10, "quantity", seed=0, quantity_sigma=2.0, min_samples=20)

    # Assert
    sizes = [len(part) for part in parts]
    assert sum(sizes) == 1000
    assert min(sizes) >= 20
    assert max(sizes) > 2 * min(sizes)


def test_quantity_with_zero_sigma_is_equal() -> None:
    # Execute
    parts = partition_indices(np.zeros(100, dtype=np.int64), 4, "quantity", seed=0, quantity_sigma=0.0)

    # Assert
    assert [len(part) for part in parts] == [25, 25, 25, 25]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_devices": 11, "kind": "iid"}, "num_devices"),
        ({"num_devices": 0, "kind": "iid"}, "num_devices"),
        ({"num_devices": 2, "kind": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_devices": 2, "kind": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"num_devices": 2, "kind": "pathological"}, "kind"),
        ({"num_devices": 2, "kind": "quantity", "quantity_sigma": -0.5}, "quantity_sigma"),
        ({"num_devices": 4, "kind": "shards", "shards_per_device": 3}, "shards_per_device"),
        ({"num_devices": 3, "kind": "iid", "min_samples": 4}, "min_samples"),
    ],
)
def test_bad_partition_arguments_name_the_argument(kwargs: dict[str, Any], named: str) -> None:
    # Prepare
    labels = np.arange(10) % 2

    # Execute
    with pytest.raises(DataError) as caught:
        partition_indices(labels, seed=0, **kwargs)

    # Assert
    assert f"{named}=" in str(caught.value)


def test_unknown_kind_lists_allowed_kinds() -> None:
    # Execute
    with pytest.raises(DataError) as caught:
        partition_indices(np.zeros(4, dtype=np.int64), 2, "label-skew", seed=0)

    # Assert
    assert "iid, shards, dirichlet, quantity" in str(caught.value)
