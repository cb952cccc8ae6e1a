"""CIFAR-10: image folders (directory and .tar.gz), the binary release, the decode cache, discovery, models."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amble.config import ExperimentConfig
from amble.data import cifar as cifar_module
from amble.data import load_dataset
from amble.data.cifar import CLASS_NAMES, CifarSource, decode
from amble.errors import DataError
from amble.models import build_model

REAL_ARCHIVE = Path("/work/shared/datasets/cifar10-jpg.tar.gz")
CACHE_FILES = ["stamp.json", "x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, no user AMBLE_DATA_DIR, and a cache of this test's own; returns the CIFAR cache folder."""
    monkeypatch.setenv("AMBLE_OFFLINE", "1")
    monkeypatch.delenv("AMBLE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "amble" / "datasets" / "cifar10"


def _no_decoding(source: CifarSource) -> None:
    raise AssertionError(f"decoded {source.path} although the cache is current")


# --------------------------------------------------------------------------- fixture builders


def jpeg_bytes(rgb: tuple[int, int, int]) -> bytes:
    """A 32x32 JPEG of one flat colour: such images decode back to exactly that colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def black_white_images(per_class: int) -> dict[str, dict[str, list[bytes]]]:
    """split -> class -> images, alternating black and white: train pixels then standardise to exactly -1 / +1."""
    black, white = jpeg_bytes((0, 0, 0)), jpeg_bytes((255, 255, 255))
    return {
        split: {name: [black if index % 2 == 0 else white for index in range(per_class)] for name in CLASS_NAMES}
        for split in ("train", "test")
    }


def write_image_folder(folder: Path, images: dict[str, dict[str, list[bytes]]]) -> Path:
    for split, classes in images.items():
        for name, encoded in classes.items():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for index, data in enumerate(encoded):
                (folder / split / name / f"{index:04d}.jpg").write_bytes(data)
    return folder


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A .tar.gz holding ``members`` in exactly the given order."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def image_members(images: dict[str, dict[str, list[bytes]]], prefix: str = "") -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}{split}/{name}/{index:04d}.jpg", data)
        for split, classes in images.items()
        for name, encoded in classes.items()
        for index, data in enumerate(encoded)
    ]


def binary_records(labels: list[int]) -> bytes:
    """Binary-release records; record i is all black (even i) or all white (odd i) in every channel."""
    records = np.zeros((len(labels), 3073), dtype=np.uint8)
    records[:, 0] = labels
    records[1::2, 1:] = 255
    return records.tobytes()


def binary_files(per_file: int = 4) -> dict[str, bytes]:
    names = [f"data_batch_{index}.bin" for index in range(1, 6)] + ["test_batch.bin"]
    return {name: binary_records([(index + k) % 10 for k in range(per_file)]) for index, name in enumerate(names)}


def write_binary_release(folder: Path, per_file: int = 4) -> Path:
    """``folder/cifar-10-batches-bin/`` with five train batches and a test batch of ``per_file`` records."""
    batches = folder / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    for name, data in binary_files(per_file).items():
        (batches / name).write_bytes(data)
    return folder


# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("layout", ["directory", "tar.gz"])
def test_image_folder_loads_shapes_labels_and_standardises(tmp_path: Path, layout: str) -> None:
    # Prepare: 2 train and 2 test images per class, black then white
    images = black_white_images(per_class=2)
    if layout == "directory":
        root = write_image_folder(tmp_path / "cifar-jpg", images)
    else:
        root = write_tar(tmp_path / "cifar10-jpg.tar.gz", image_members(images))

    # Execute
    dataset = load_dataset("cifar10", root=str(root))

    # Assert
    assert dataset.name == "cifar10"
    assert dataset.num_classes == 10
    assert dataset.input_shape == (3, 32, 32)
    assert dataset.x_train.shape == (20, 3, 32, 32)
    assert dataset.x_test.shape == (20, 3, 32, 32)
    assert dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64
    assert dataset.y_train.tolist() == [label for label in range(10) for _ in range(2)]
    assert dataset.y_test.tolist() == dataset.y_train.tolist()
    # train mean 0.5 and std 0.5 per channel: black is (0 - 0.5) / 0.5, white (1 - 0.5) / 0.5
    assert dataset.x_train[0::2].eq(-1.0).all()
    assert dataset.x_train[1::2].eq(1.0).all()
    assert dataset.x_test[3].eq(1.0).all()


def test_labels_follow_class_folder_names_not_archive_order(tmp_path: Path) -> None:
    # Prepare: class c is flat grey 20*c + 10, written to the archive in reverse class order, under a top folder
    images = {
        split: {name: [jpeg_bytes((20 * label + 10,) * 3)] for label, name in reversed(list(enumerate(CLASS_NAMES)))}
        for split in ("test", "train")
    }
    archive = write_tar(tmp_path / "shuffled.tar.gz", image_members(images, prefix="cifar10/"))

    # Execute
    arrays = decode(CifarSource(archive, "archive"))

    # Assert
    assert arrays["y_train"].tolist() == list(range(10))
    assert arrays["x_train"].shape == (10, 3, 32, 32)
    assert arrays["x_train"].dtype == np.uint8
    assert arrays["x_train"][:, :, 0, 0].tolist() == [[20 * label + 10] * 3 for label in range(10)]
    assert arrays["y_test"].tolist() == list(range(10))


def png_bytes(mode: str, colour: int | tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_and_grey_images_are_read_as_rgb_planes(tmp_path: Path) -> None:
    # Prepare: the first train airplane is a white grey-scale ("L") PNG, the first test one an RGB PNG
    root = write_image_folder(tmp_path / "mixed", black_white_images(per_class=2))
    for split, mode, colour in (("train", "L", 255), ("test", "RGB", (10, 20, 30))):
        (root / split / "airplane" / "0000.jpg").unlink()
        (root / split / "airplane" / "0000.png").write_bytes(png_bytes(mode, colour))

    # Execute
    arrays = decode(CifarSource(root, "image-folder"))

    # Assert
    assert arrays["x_train"].shape == (20, 3, 32, 32)
    assert arrays["x_train"][0].min() == 255
    assert arrays["x_test"][0, :, 5, 9].tolist() == [10, 20, 30]
    assert (arrays["x_test"][0, 2] == 30).all()


def test_unknown_class_folder_is_named(tmp_path: Path) -> None:
    # Prepare
    root = write_image_folder(tmp_path / "jpg", black_white_images(per_class=1))
    (root / "train" / "unicorn").mkdir()

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(root))

    # Assert
    assert "'unicorn'" in str(caught.value)
    assert "airplane, automobile" in str(caught.value)


def test_missing_class_is_reported(tmp_path: Path) -> None:
    # Prepare
    images = black_white_images(per_class=1)
    del images["test"]["frog"]
    archive = write_tar(tmp_path / "partial.tar.gz", image_members(images))

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(archive))

    # Assert
    assert str(archive) in str(caught.value)
    assert "test/ has no images of class frog" in str(caught.value)


def test_corrupt_jpeg_is_named(tmp_path: Path) -> None:
    # Prepare
    root = write_image_folder(tmp_path / "jpg", black_white_images(per_class=1))
    broken = root / "test" / "ship" / "0000.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(root))

    # Assert
    assert str(broken) in str(caught.value)
    assert "cannot decode" in str(caught.value)


def test_wrong_image_size_is_named(tmp_path: Path) -> None:
    # Prepare
    images = black_white_images(per_class=1)
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buffer, format="JPEG")
    images["train"]["dog"] = [buffer.getvalue()]
    archive = write_tar(tmp_path / "odd.tar.gz", image_members(images))

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(archive))

    # Assert
    assert f"{archive} member train/dog/0000.jpg" in str(caught.value)
    assert "28x28" in str(caught.value)


def test_archive_that_is_not_a_tar_is_named(tmp_path: Path) -> None:
    # Prepare
    archive = tmp_path / "cifar10-jpg.tar.gz"
    archive.write_bytes(b"this is not a gzip file")

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(archive))

    # Assert
    assert str(archive) in str(caught.value)
    assert "not a readable tar archive" in str(caught.value)


# --------------------------------------------------------------------------- binary release


def test_binary_records_are_channel_major(tmp_path: Path) -> None:
    # Prepare: one record with label 7 and planes R=10, G=20, B=30 in each of the six files
    record = bytes([7]) + bytes([10]) * 1024 + bytes([20]) * 1024 + bytes([30]) * 1024
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in [f"data_batch_{index}.bin" for index in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(record)

    # Execute
    arrays = decode(CifarSource(folder, "binary-folder"))

    # Assert
    assert arrays["x_train"].shape == (5, 3, 32, 32)
    assert arrays["y_train"].tolist() == [7] * 5
    assert arrays["x_test"][0, :, 5, 9].tolist() == [10, 20, 30]


@pytest.mark.parametrize("layout", ["release folder", "batches folder", "tar.gz"])
def test_binary_release_loads(tmp_path: Path, layout: str) -> None:
    # Prepare
    release = write_binary_release(tmp_path / "release", per_file=4)
    if layout == "release folder":
        root = release
    elif layout == "batches folder":
        root = release / "cifar-10-batches-bin"
    else:
        members = [(f"cifar-10-batches-bin/{name}", data) for name, data in binary_files(per_file=4).items()]
        root = write_tar(tmp_path / "cifar-10-binary.tar.gz", [("cifar-10-batches-bin/readme.html", b"hi"), *members])

    # Execute
    dataset = load_dataset("cifar10", root=str(root))

    # Assert: data_batch_k holds labels (k-1+j) % 10 for j = 0..3
    assert dataset.x_train.shape == (20, 3, 32, 32)
    assert dataset.x_test.shape == (4, 3, 32, 32)
    assert dataset.y_train[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert dataset.y_test.tolist() == [5, 6, 7, 8]
    assert dataset.x_train[0::2].eq(-1.0).all()
    assert dataset.x_train[1::2].eq(1.0).all()


def test_truncated_binary_file_is_named(tmp_path: Path) -> None:
    # Prepare
    batch = write_binary_release(tmp_path / "release") / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(tmp_path / "release"))

    # Assert
    message = str(caught.value)
    assert str(batch) in message
    assert f"{4 * 3073 - 100} bytes" in message
    assert "3073-byte records" in message
    assert "cifar-10-binary.tar.gz" in message


def test_binary_label_out_of_range_is_named(tmp_path: Path) -> None:
    # Prepare: record 2 of test_batch.bin claims label 42
    batch = write_binary_release(tmp_path / "release") / "cifar-10-batches-bin" / "test_batch.bin"
    data = bytearray(batch.read_bytes())
    data[2 * 3073] = 42
    batch.write_bytes(bytes(data))

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(tmp_path / "release"))

    # Assert
    assert str(batch) in str(caught.value)
    assert "record 2 has label 42" in str(caught.value)


def test_missing_batch_file_in_archive_is_named(tmp_path: Path) -> None:
    # Prepare
    members = [(name, data) for name, data in binary_files().items() if name != "data_batch_4.bin"]
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", members)

    # Execute / Assert
    with pytest.raises(DataError, match=r"missing data_batch_4\.bin"):
        load_dataset("cifar10", root=str(archive))


# --------------------------------------------------------------------------- decode cache


def test_first_load_writes_the_cache_and_the_second_reads_it(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    archive = write_tar(tmp_path / "cifar10-jpg.tar.gz", image_members(black_white_images(per_class=2)))
    first = load_dataset("cifar10", root=str(archive))
    stamp = json.loads((offline / "stamp.json").read_text())
    monkeypatch.setattr(cifar_module, "decode", _no_decoding)

    # Execute
    second = load_dataset("cifar10", root=str(archive))

    # Assert
    assert sorted(path.name for path in offline.iterdir()) == CACHE_FILES
    assert stamp["source"]["path"] == str(archive)
    assert stamp["source"]["size"] == archive.stat().st_size
    assert np.load(offline / "x_train.npy", allow_pickle=False).shape == (20, 3, 32, 32)
    assert np.load(offline / "y_train.npy", allow_pickle=False).dtype == np.uint8
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)


def test_changed_source_is_decoded_again(tmp_path: Path) -> None:
    # Prepare
    root = write_image_folder(tmp_path / "jpg", black_white_images(per_class=2))
    load_dataset("cifar10", root=str(root))
    (root / "train" / "cat" / "0002.jpg").write_bytes(jpeg_bytes((255, 255, 255)))

    # Execute
    dataset = load_dataset("cifar10", root=str(root))

    # Assert
    assert dataset.x_train.shape == (21, 3, 32, 32)


def test_cache_alone_serves_auto_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: decode once from an explicit root, then search with nothing else available
    root = write_binary_release(tmp_path / "release")
    load_dataset("cifar10", root=str(root))
    monkeypatch.setattr(cifar_module, "decode", _no_decoding)

    # Execute
    dataset = load_dataset("cifar10")

    # Assert
    assert dataset.x_train.shape == (20, 3, 32, 32)


def test_cache_with_a_replaced_array_is_ignored(tmp_path: Path, offline: Path) -> None:
    # Prepare: another writer's x_test.npy no longer matches the stamp
    load_dataset("cifar10", root=str(write_binary_release(tmp_path / "release")))
    np.save(offline / "x_test.npy", np.zeros((4, 3, 32, 32), dtype=np.uint8))

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10")

    # Assert
    assert "not found" in str(caught.value)


# --------------------------------------------------------------------------- discovery


def test_missing_explicit_root_fails_even_if_amble_data_dir_has_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    write_image_folder(tmp_path / "data" / "cifar10", black_white_images(per_class=1))
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "data"))
    wrong = tmp_path / "typo"

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(wrong))

    # Assert
    assert f"data.root={wrong} does not exist" in str(caught.value)
    assert "data_batch_1.bin" in str(caught.value)


def test_explicit_root_without_cifar_data_says_what_it_expected(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root=str(tmp_path / "empty"))

    # Assert
    assert "is empty of CIFAR-10 data" in str(caught.value)
    assert "train/ and test/" in str(caught.value)


@pytest.mark.parametrize(
    "place", ["cifar10 folder", "archive in cifar10", "archive in AMBLE_DATA_DIR", "batches in AMBLE_DATA_DIR"]
)
def test_amble_data_dir_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, place: str) -> None:
    # Prepare: image folders hold 1 train image per class (10), the binary release 4 per batch (20)
    data_dir = tmp_path / "data"
    images = black_white_images(per_class=1)
    if place == "cifar10 folder":
        write_image_folder(data_dir / "cifar10", images)
    elif place == "batches in AMBLE_DATA_DIR":
        write_binary_release(data_dir)
    else:
        folder = data_dir / "cifar10" if place == "archive in cifar10" else data_dir
        folder.mkdir(parents=True)
        write_tar(folder / "cifar10-jpg.tar.gz", image_members(images))
    monkeypatch.setenv("AMBLE_DATA_DIR", str(data_dir))

    # Execute
    dataset = load_dataset("cifar10")

    # Assert
    assert dataset.x_train.shape == ((20 if place == "batches in AMBLE_DATA_DIR" else 10), 3, 32, 32)


def test_bare_image_folders_in_amble_data_dir_are_not_taken_for_cifar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: train/ and test/ directly in AMBLE_DATA_DIR could be any dataset's
    write_image_folder(tmp_path / "data", black_white_images(per_class=1))
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "data"))

    # Execute / Assert
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10")


def test_offline_not_found_says_where_it_looked_and_how_to_get_it(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("AMBLE_DATA_DIR", str(tmp_path / "data"))

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10")

    # Assert
    message = str(caught.value)
    assert "CIFAR-10 ('cifar10') not found" in message
    assert str(tmp_path / "data" / "cifar10") in message
    assert str(offline) in message
    assert "AMBLE_OFFLINE" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message
    assert "cifar10-jpg.tar.gz" in message
    assert "data.root" in message
    assert "AMBLE_DATA_DIR" in message


def test_download_decodes_into_the_cache_and_keeps_only_the_arrays(
    mirror: tuple[str, Path], offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    base_url, folder = mirror
    members = [(f"cifar-10-batches-bin/{name}", data) for name, data in binary_files().items()]
    archive = write_tar(folder / "cifar-10-binary.tar.gz", members)
    monkeypatch.setattr(cifar_module, "DOWNLOAD_URL", f"{base_url}cifar-10-binary.tar.gz")
    monkeypatch.setattr(cifar_module, "DOWNLOAD_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.delenv("AMBLE_OFFLINE")

    # Execute
    dataset = load_dataset("cifar10")

    # Assert
    assert dataset.x_train.shape == (20, 3, 32, 32)
    assert sorted(path.name for path in offline.iterdir()) == CACHE_FILES


def test_failed_download_names_the_url(
    mirror: tuple[str, Path], offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the mirror is empty, so the request is a 404
    base_url, _ = mirror
    monkeypatch.setattr(cifar_module, "DOWNLOAD_URL", f"{base_url}cifar-10-binary.tar.gz")
    monkeypatch.delenv("AMBLE_OFFLINE")

    # Execute
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10")

    # Assert
    assert "404" in str(caught.value)
    assert f"{base_url}cifar-10-binary.tar.gz" in str(caught.value)
    assert list(offline.iterdir()) == []


# --------------------------------------------------------------------------- config and models


def test_config_accepts_cifar10_and_cifar_cnn() -> None:
    # Execute
    config = ExperimentConfig.model_validate({"data": {"dataset": "cifar10"}, "model": "cifar-cnn"})

    # Assert
    assert config.data.dataset == "cifar10"
    assert config.model == "cifar-cnn"


def test_cifar_cnn_has_188_810_parameters() -> None:
    # Prepare: (32*3*9+32) + (64*32*9+64) + (64*64*9+64) + (64*4*4*128+128) + (128*10+10)
    expected = 896 + 18_496 + 36_928 + 131_200 + 1_290

    # Execute
    model = build_model("cifar-cnn", (3, 32, 32), 10)

    # Assert
    assert sum(parameter.numel() for parameter in model.parameters()) == expected == 188_810


@pytest.mark.parametrize("name", ["cifar-cnn", "resnet20"])
def test_cifar_models_classify_loaded_images(tmp_path: Path, name: str) -> None:
    # Prepare
    dataset = load_dataset("cifar10", root=str(write_binary_release(tmp_path / "release")))
    torch.manual_seed(0)
    model = build_model(name, dataset.input_shape, dataset.num_classes)

    # Execute
    logits = model(dataset.x_train[:5])

    # Assert
    assert logits.shape == (5, 10)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- real CIFAR-10 (JPEG copy)


@pytest.mark.e2e
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason=f"{REAL_ARCHIVE} not present")
def test_real_jpeg_archive_is_decoded_then_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    # Execute: decoding 60,000 JPEGs takes about 10-15 s
    dataset = load_dataset("cifar10", root=str(REAL_ARCHIVE))
    monkeypatch.setattr(cifar_module, "decode", _no_decoding)
    again = load_dataset("cifar10", root=str(REAL_ARCHIVE))

    # Assert
    assert dataset.x_train.shape == (50_000, 3, 32, 32)
    assert dataset.x_test.shape == (10_000, 3, 32, 32)
    assert torch.bincount(dataset.y_train).tolist() == [5_000] * 10
    assert torch.bincount(dataset.y_test).tolist() == [1_000] * 10
    assert dataset.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (dataset.x_train.std(dim=(0, 2, 3)) - 1.0).abs().max() < 1e-3
    assert torch.equal(dataset.x_test, again.x_test)
