"""Bring your own model and data: import-path models, .npz / .safetensors / loader / image-folder data,
natural partitions and the Python API, end to end with real training; every mistake a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file
from safetensors.torch import load_file
from torch import nn

import amble
from amble.client.device import check_what_the_server_names
from amble.config import config_from_dict, load_config
from amble.data import load_dataset, partition_indices
from amble.errors import ConfigError, DataError
from amble.models import build_model
from amble.problem import load_data
from amble.runsetup import device_shards
from tests.byo_models import make_net, separable_data
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
T_REF = {8: 0.001, 16: 0.0015, 64: 0.003}


def small_config(dataset: str, **changes: Any) -> dict[str, Any]:
    """Four devices, two per round, three rounds, pinned step times: seconds of real training."""
    config: dict[str, Any] = {
        "name": "byo",
        "seed": 0,
        "data": {"dataset": dataset, "num_devices": 4},
        "model": "tests.byo_models:make_net",
        "model_args": {"hidden": 8},
        "fleet": {"kind": "tiers", "t_ref": T_REF},
        "rounds": 3,
        "devices_per_round": 2,
        "train": {"batch_size": 16, "lr": 0.2},
        "strategies": ["fedavg", "amble"],
        "eval": {"target_accuracy": 0.8},
    }
    config.update(changes)
    return config


def write_split_npz(path: Path, train: int = 320, test: int = 80, **extra: Any) -> None:
    """Two classes split by the sign of the first of six features, given as train and test splits."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(train + test, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    arrays = {"x_train": x[:train], "y_train": y[:train], "x_test": x[train:], "y_test": y[train:], **extra}
    np.savez(path, **arrays)


def amble_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m amble ...`` in a process of its own, with this checkout and the tests importable."""
    path = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-m", "amble", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- end to end


def test_import_path_model_trains_on_npz_vectors_from_the_cli(tmp_path: Path) -> None:
    # Prepare: the data path is relative to the config file's folder, the command runs elsewhere
    project = tmp_path / "project"
    project.mkdir()
    write_split_npz(project / "vectors.npz")
    (project / "byo.yaml").write_text(json.dumps(small_config("vectors.npz", rounds=5)))
    out = tmp_path / "out"

    # Execute
    done = amble_cli("run", str(project / "byo.yaml"), "--out", str(out), "--no-progress", cwd=tmp_path)

    # Assert
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["data"]["dataset"] == str(project / "vectors.npz")
    assert summary["config"]["model"] == "tests.byo_models:make_net"
    assert len(read_jsonl(out / "metrics.jsonl")) == 2 * 5
    weights = load_file(str(out / "model_fedavg.safetensors"))
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "1.weight": (8, 6),  # hidden=8 from model_args, 6 features
        "1.bias": (8,),
        "3.weight": (2, 8),  # two classes
        "3.bias": (2,),
    }
    # The first feature's sign is the label: five rounds of real training learn it.
    assert summary["strategies"]["fedavg"]["best_accuracy"] >= 0.8
    assert summary["strategies"]["amble"]["best_accuracy"] >= 0.8


def test_natural_partition_gives_each_owner_its_own_device(tmp_path: Path) -> None:
    # Prepare: owner k holds 10 + 10k samples; owner 0 only label 0, owner 3 only label 1, the others both
    sizes, labels, owners = [10, 20, 30, 40], [], []
    for owner, size in enumerate(sizes):
        owner_labels = [0] * size if owner == 0 else [1] * size if owner == 3 else [0, 1] * (size // 2)
        labels += owner_labels
        owners += [owner] * size
    count = len(labels)
    x = np.arange(count * 2, dtype=np.float32).reshape(count, 2) / count
    np.savez(
        tmp_path / "users.npz",
        x_train=x,
        y_train=np.array(labels),
        owner_train=np.array(owners),
        x_test=x[:4],
        y_test=np.array([0, 1, 0, 1]),
    )
    data = {"dataset": str(tmp_path / "users.npz"), "num_devices": 4, "partition": {"kind": "natural"}}
    config = config_from_dict(small_config("", data=data))

    # Execute
    _, shards = device_shards(config)

    # Assert
    assert [len(y) for _, y in shards] == [10, 20, 30, 40]
    assert [torch.bincount(y, minlength=2).tolist() for _, y in shards] == [[10, 0], [10, 10], [15, 15], [0, 40]]


def test_natural_partition_runs_end_to_end_with_owners_from_a_loader(tmp_path: Path) -> None:
    # Prepare: the loader's 400 samples belong to owners 0..3 in turn; 80 are held out for testing
    data = {"dataset": "tests.byo_models:separable_data", "num_devices": 4, "partition": {"kind": "natural"}}
    config = config_from_dict(small_config("", data=data))

    # Execute
    result = amble.run(config, out_dir=tmp_path / "out")

    # Assert: each device holds one owner's training samples (100 each, less those held out)
    dataset, shards = device_shards(config)
    owners = dataset.owner_train
    assert owners is not None and len(owners) == 320
    assert [len(y) for _, y in shards] == torch.bincount(owners).tolist()
    rows = read_jsonl(result.devices)
    assert {row["device"] for row in rows} <= {0, 1, 2, 3}
    assert len(read_jsonl(result.metrics)) == 2 * 3


def test_natural_partition_groups_owners_balanced_by_samples() -> None:
    # Prepare: owners 0..3 hold 5, 3, 2 and 2 samples
    owners = np.array([0] * 5 + [1] * 3 + [2] * 2 + [3] * 2)
    labels = np.zeros(len(owners), dtype=np.int64)

    # Execute
    parts = partition_indices(labels, 2, "natural", seed=7, owners=owners)

    # Assert: largest first onto the lightest device: 0 -> A (5), 1 -> B (3), a 2-sample owner -> B (5),
    # the other -> A (5 = 5: the lowest index): 7 and 5, each owner whole on one device
    assert [len(part) for part in parts] == [7, 5]
    assert set(owners[parts[0]].tolist()) >= {0} and set(owners[parts[1]].tolist()) >= {1}
    assert all(len(set(owners[part].tolist())) == 2 for part in parts)
    again = partition_indices(labels, 2, "natural", seed=7, owners=owners)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_natural_partition_errors_name_the_fix() -> None:
    labels = np.zeros(6, dtype=np.int64)
    with pytest.raises(DataError, match="needs an owner column"):
        partition_indices(labels, 2, "natural", seed=0)
    with pytest.raises(DataError, match=r"3 owners cannot fill data\.num_devices=4"):
        partition_indices(labels, 4, "natural", seed=0, owners=np.array([0, 0, 1, 1, 2, 2]))


def test_python_api_gives_the_same_results_as_the_cli(tmp_path: Path) -> None:
    # Prepare: the same config and arrays, once through `amble run`, once through amble.run
    arrays = separable_data()
    np.savez(tmp_path / "pool.npz", **arrays)
    (tmp_path / "byo.yaml").write_text(json.dumps(small_config("pool.npz")))
    assert amble_cli("run", "byo.yaml", "--out", "cli", "--no-progress", cwd=tmp_path).returncode == 0

    # Execute: the model as a factory object, the data as arrays
    result = amble.run(
        small_config("unused"), model=make_net, model_args={"hidden": 8}, data=arrays, out_dir=tmp_path / "api"
    )

    # Assert
    assert result.config.model == "tests.byo_models:make_net"  # importable by name: recorded as its path
    assert result.config.data.dataset == str((tmp_path / "api" / "data.npz").resolve())
    assert result.report.is_file() and result.summary.is_file()
    assert set(result.strategies) == {"fedavg", "amble"}
    cli_rows, api_rows = read_jsonl(tmp_path / "cli" / "metrics.jsonl"), read_jsonl(result.metrics)
    columns = ("strategy", "round", "virtual_time_s", "accuracy", "samples_processed")
    assert [[row[c] for c in columns] for row in api_rows] == [[row[c] for c in columns] for row in cli_rows]
    cli_summary = json.loads((tmp_path / "cli" / "summary.json").read_text())["strategies"]
    assert result.strategies["amble"]["final_accuracy"] == cli_summary["amble"]["final_accuracy"]


def test_python_api_takes_an_in_memory_model_and_a_yaml_config(tmp_path: Path) -> None:
    # Prepare: a lambda cannot be imported by name: it builds the model in this process
    (tmp_path / "byo.yaml").write_text(json.dumps(small_config("tests.byo_models:separable_data")))

    def factory(shape: tuple[int, ...], classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(shape[0], 4), nn.ReLU(), nn.Linear(4, classes))

    # Execute
    result = amble.run(tmp_path / "byo.yaml", model=factory, model_args={}, out_dir=tmp_path / "out",
                       overrides=["rounds=2"])  # fmt: skip

    # Assert
    weights = load_file(str(tmp_path / "out" / "model_amble.safetensors"))
    assert tuple(weights["0.weight"].shape) == (4, 6)
    assert result.config.rounds == 2
    assert result.config.model.endswith("factory")


def test_integer_token_inputs_calibrate_and_train(tmp_path: Path) -> None:
    # Prepare: sequences of 5 token ids; no t_ref, so the clock times real steps on real samples
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, size=(200, 5))
    np.savez(tmp_path / "tokens.npz", x=tokens, y=(tokens[:, 0] >= 4).astype(np.int64))
    raw = small_config(str(tmp_path / "tokens.npz"), model="tests.byo_models:TokenNet", model_args={"vocab": 8},
                       fleet={"kind": "tiers"}, rounds=2)  # fmt: skip

    # Execute
    result = amble.run(raw, out_dir=tmp_path / "out")

    # Assert
    calibration = json.loads(result.summary.read_text())["calibration"]["t_ref_s"]
    assert sorted(int(batch) for batch in calibration) == [8, 16, 32, 64, 128, 256, 512]
    assert all(seconds > 0 for seconds in calibration.values())
    assert result.strategies["fedavg"]["rounds"] == 2


# --------------------------------------------------------------------------- data formats


def test_safetensors_pool_is_split_by_the_seeded_test_fraction(tmp_path: Path) -> None:
    # Prepare
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    save_file({"x": x, "y": (np.arange(50) % 3).astype(np.int64)}, str(tmp_path / "pool.safetensors"))

    # Execute
    first = load_dataset(str(tmp_path / "pool.safetensors"), seed=4, test_fraction=0.2)
    again = load_dataset(str(tmp_path / "pool.safetensors"), seed=4, test_fraction=0.2)

    # Assert: 10 of 50 held out, disjoint, the same draw for the same seed
    assert (len(first.y_train), len(first.y_test)) == (40, 10)
    assert first.input_shape == (3,) and first.num_classes == 3
    rows = {int(v) for v in first.x_train[:, 0]} | {int(v) for v in first.x_test[:, 0]}
    assert rows == set(range(0, 150, 3))
    assert torch.equal(first.x_test, again.x_test)


def test_image_folder_of_the_users_own(tmp_path: Path) -> None:
    # Prepare: 6x4 grey images, classes "cat" and "ant" (sorted: ant=0, cat=1)
    for split, per_class in (("train", 3), ("test", 1)):
        for value, name in ((40, "cat"), (200, "ant")):
            folder = tmp_path / "pics" / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                Image.new("L", (6, 4), color=value).save(folder / f"{index}.png")

    # Execute
    dataset = load_dataset(str(tmp_path / "pics"))

    # Assert
    assert dataset.input_shape == (1, 4, 6)
    assert dataset.num_classes == 2
    assert dataset.y_train.tolist() == [0, 0, 0, 1, 1, 1] and dataset.y_test.tolist() == [0, 1]
    assert float(dataset.x_train[0].mean()) > 0 > float(dataset.x_train[3].mean())  # ant is brighter


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((4, 2)), "labels": np.zeros(4, dtype=np.int64)}, "found arrays ['labels', 'x'], expected"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "negative values"),
        ({"x": np.array([[0.0], [np.nan], [1.0], [2.0]]), "y": np.zeros(4, dtype=np.int64)}, "NaN"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4), "num_classes": np.array(2)}, "1-D integer array"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 3]), "num_classes": np.array(3)}, "labels go up to 3"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=np.int64)}, "(N, 1)"),
    ],
)
def test_bad_arrays_are_clear_errors(tmp_path: Path, arrays: dict[str, Any], fragment: str) -> None:
    # Prepare
    np.savez(tmp_path / "bad.npz", **arrays)

    # Execute / Assert
    with pytest.raises(DataError) as caught:
        load_dataset(str(tmp_path / "bad.npz"))
    assert fragment in str(caught.value)


def test_model_that_is_not_a_module_or_not_callable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"returned a dict, not a torch\.nn\.Module"):
        build_model("tests.byo_models:not_a_module", (3,), 2)
    with pytest.raises(ConfigError, match="is a int, not a callable"):
        build_model("tests.byo_models:NOT_CALLABLE", (3,), 2)
    with pytest.raises(ConfigError, match="raised TypeError"):
        build_model("tests.byo_models:make_net", (3,), 2, model_args={"width": 4})


def test_unknown_model_or_missing_data_file_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(json.dumps(small_config("nowhere.npz")))
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="import path"):
        config_from_dict(small_config(str(tmp_path), model="not a model"))


# --------------------------------------------------------------------------- the CLI's errors


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"model": "nosuchpkg.nets:make"}, ["module 'nosuchpkg.nets' is not importable", "PYTHONPATH"]),
        ({"model": "tests.byo_models:make_nett"}, ["has no attribute 'make_nett'"]),
        ({"model": "tests.byo_models:wrong_output", "model_args": {}}, ["returns (2, 3)", "(2, 2)"]),
        ({"data": "mismatched"}, ["x_train has 10, y_train has 9"]),
        ({"data": "objects"}, ["'y_train' holds Python objects (dtype=object)", "never unpickles"]),
    ],
)
def test_cli_errors_name_the_fix_without_a_traceback(
    tmp_path: Path, change: dict[str, Any], fragments: list[str]
) -> None:
    # Prepare
    if change.get("data") == "mismatched":
        np.savez(tmp_path / "d.npz", x_train=np.zeros((10, 2)), y_train=np.zeros(9, dtype=np.int64),
                 x_test=np.zeros((2, 2)), y_test=np.zeros(2, dtype=np.int64))  # fmt: skip
    elif change.get("data") == "objects":
        labels = np.array([0, "one", 2], dtype=object)
        np.savez(tmp_path / "d.npz", x_train=np.zeros((3, 2)), y_train=labels, x_test=np.zeros((1, 2)), y_test=[0])
    else:
        write_split_npz(tmp_path / "d.npz")
    config = small_config("d.npz", **{k: v for k, v in change.items() if k != "data"})
    (tmp_path / "c.yaml").write_text(json.dumps(config))

    # Execute
    done = amble_cli("run", "c.yaml", "--out", "out", "--no-progress", cwd=tmp_path)

    # Assert
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


# --------------------------------------------------------------------------- the example


def test_tabular_example_has_ten_clinics_with_the_documented_label_skew(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the example's folder on the path, as its README command puts it
    monkeypatch.syspath_prepend(str(REPO / "examples" / "tabular"))
    config = load_config(REPO / "examples" / "tabular" / "tabular.yaml")

    # Execute
    dataset, shards = device_shards(config)

    # Assert: 569 patients, 114 held out; ten clinics by decile of mean radius, whole on their devices
    assert (len(dataset.y_train), len(dataset.y_test), dataset.input_shape) == (455, 114, (30,))
    assert len(shards) == 10 and sum(len(y) for _, y in shards) == 455
    assert [len(y) for _, y in shards] == [46, 46, 44, 48, 43, 47, 43, 46, 42, 50]
    # label 1 is benign in scikit-learn's set: the smallest tumours are all benign, the largest all malignant
    assert [int(y.sum()) for _, y in shards] == [46, 45, 40, 45, 36, 33, 29, 7, 0, 0]


def test_text_example_builds_token_windows_and_an_lstm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.syspath_prepend(str(REPO / "examples" / "text"))
    config = load_config(REPO / "examples" / "text" / "text.yaml")

    # Execute
    dataset, shards = device_shards(config)
    model = build_model(config.model, dataset.input_shape, dataset.num_classes, input_dtype=dataset.x_train.dtype)

    # Assert: 16-character windows as int64 ids, 32 distinct characters, one device per paragraph
    assert (dataset.x_train.dtype, dataset.input_shape, dataset.num_classes) == (torch.int64, (16,), 32)
    assert len(shards) == 7 and sum(len(y) for _, y in shards) == len(dataset.y_train)
    assert tuple(model(dataset.x_test[:3]).shape) == (3, 32)


# --------------------------------------------------------------------------- real devices


def test_real_devices_resolve_the_model_from_their_own_installed_code(tmp_path: Path) -> None:
    """`amble serve` and two `amble device` processes on a user's model and .npz: a device without the
    model's code installed stops with what to install; one with its data elsewhere uses --data-root."""
    # Prepare
    write_split_npz(tmp_path / "vectors.npz")
    elsewhere = tmp_path / "device-copy"
    elsewhere.mkdir()
    write_split_npz(elsewhere / "vectors.npz")
    config = small_config("vectors.npz", rounds=2, strategies=["fedavg"])
    config["data"]["num_devices"] = 2
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    port, out = free_port(), tmp_path / "out"
    with_tests = os.pathsep.join([str(REPO / "src"), str(REPO)])
    serve_log = (tmp_path / "serve.log").open("w")  # a file, not a pipe: nobody reads it while devices run
    serve = subprocess.Popen(
        [sys.executable, "-m", "amble", "serve", "c.yaml", "--port", str(port), "--out", str(out), "--linger-s", "2"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": with_tests},
        stdout=serve_log,
        stderr=subprocess.STDOUT,
    )
    try:
        while not (out / "tokens.json").is_file():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        tokens = json.loads((out / "tokens.json").read_text())

        def device(token: str, pythonpath: str, *extra: str) -> subprocess.Popen[bytes]:
            command = [sys.executable, "-m", "amble", "device", "--server", f"http://127.0.0.1:{port}", "--threads=1"]
            env = {**os.environ, "AMBLE_TOKEN": token, "PYTHONPATH": pythonpath}
            return subprocess.Popen([*command, *extra], cwd=tmp_path, env=env, stderr=subprocess.PIPE)

        # Execute
        # A device imports only packages its operator allows, and reads a user's file only from --data-root.
        trusting = ("--allow-import", "tests", "--data-root")
        refused = device(tokens["0"], with_tests)
        _, refused_err = refused.communicate(timeout=120)
        missing = device(tokens["0"], str(REPO / "src"), *trusting, str(tmp_path))  # the module is not installed
        _, missing_err = missing.communicate(timeout=120)
        devices = [
            device(tokens["0"], with_tests, *trusting, str(tmp_path)),
            device(tokens["1"], with_tests, *trusting, str(elsewhere)),
        ]
        errors = [process.communicate(timeout=180)[1].decode() for process in devices]
        serve.wait(timeout=60)

        # Assert
        assert refused.returncode == 2 and "add --allow-import tests" in refused_err.decode()
        assert "Traceback" not in refused_err.decode()
        assert missing.returncode == 2
        assert "module 'tests.byo_models' is not importable" in missing_err.decode()
        assert "Traceback" not in missing_err.decode()
        assert [process.returncode for process in devices] == [0, 0], errors
        assert serve.returncode == 0, (tmp_path / "serve.log").read_text()
        rounds = read_jsonl(out / "serve.jsonl")
        expected = [(0, "finalized", 2), (1, "finalized", 2)]
        assert [(row["round"], row["status"], row["counted"]) for row in rounds] == expected
        assert {plan["local_steps"] for row in rounds for plan in row["plans"].values()} == {10}  # 160 samples / 16
    finally:
        for process in [serve, *locals().get("devices", [])]:
            if process.poll() is None:
                process.kill()
        serve_log.close()


def test_a_device_loads_what_the_server_names_only_with_its_operators_leave(tmp_path: Path) -> None:
    # Prepare: a server's config naming a model by import path and a data file by its own path
    write_split_npz(tmp_path / "vectors.npz")
    config = config_from_dict(small_config(str(tmp_path / "vectors.npz")))
    assert config.model == "tests.byo_models:make_net"

    # Execute / Assert: refused with the flag that allows it, then allowed
    with pytest.raises(ConfigError, match="add --allow-import tests"):
        check_what_the_server_names(config, (), str(tmp_path))
    with pytest.raises(ConfigError, match="Pass --data-root"):
        check_what_the_server_names(config, ("tests",), None)
    check_what_the_server_names(config, ("tests",), str(tmp_path))
    built_in = config_from_dict({"data": {"dataset": "synthetic"}, "model": "mlp"})
    check_what_the_server_names(built_in, (), None)  # built-ins need no leave


def test_data_root_says_where_a_users_file_is_on_this_machine(tmp_path: Path) -> None:
    # Prepare: the config names one file; this machine's copy (other values) is elsewhere
    write_split_npz(tmp_path / "vectors.npz")
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    write_split_npz(elsewhere / "vectors.npz", train=30, test=10)
    config = config_from_dict(small_config(str(tmp_path / "vectors.npz")))

    # Execute
    default, by_folder = load_data(config), load_data(config, str(elsewhere))
    by_file = load_data(config, str(elsewhere / "vectors.npz"))

    # Assert
    assert (len(default.y_train), len(by_folder.y_train), len(by_file.y_train)) == (320, 30, 30)
