"""Config loading: YAML, --set overrides and one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from amble.config import load_config
from amble.errors import AmbleError, ConfigError
from amble.strategies import AmbleSettings

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def test_quickstart_loads_with_both_strategies() -> None:
    config = load_config(QUICKSTART)
    assert [s.name for s in config.strategies] == ["fedavg", "amble"]
    assert config.data.partition.kind == "shards"
    assert config.fleet.kind == "tiers"


def test_overrides_set_nested_keys_and_list_items() -> None:
    config = load_config(
        QUICKSTART,
        ["rounds=3", "data.partition.kind=dirichlet", "data.partition.alpha=0.1", "strategies.1.lr_scaling=sqrt"],
    )
    assert config.rounds == 3
    assert (config.data.partition.kind, config.data.partition.alpha) == ("dirichlet", 0.1)
    amble = config.strategies[1]
    assert isinstance(amble, AmbleSettings) and amble.lr_scaling == "sqrt"


def test_override_turns_a_shorthand_strategy_into_a_table() -> None:
    config = load_config(QUICKSTART, ["strategies.0.label=baseline"])
    assert config.strategies[0].label == "baseline"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["roundz=3"], "key 'roundz'"),
        (["rounds=many"], "key 'rounds'"),
        (["fleet.kind=magic"], "key 'fleet.kind'"),
        (["strategies.1.lr_scaling=cubic"], "key 'strategies.1.lr_scaling'"),
        (["strategies.0.batch_min=8"], "batch_min"),  # an amble knob on fedavg is an unknown key
        (["data.dataset=imagenet"], "key 'data.dataset'"),
        (["devices_per_round=1000"], "devices_per_round"),
        (["strategies.5.name=amble"], "not an index"),
        (["rounds"], "key=value"),
        (["run.parallel=0"], "run.parallel must be auto or a whole number of processes >= 1 (got 0)"),
        (["run.parallel=2", "server.store=redis://127.0.0.1:6379/0"], "only embedded runs"),
        (["run.threads=0"], "key 'run.threads'"),
        (["eval.subsample=0"], "key 'eval.subsample'"),
    ],
)
def test_invalid_configs_name_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, overrides)
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_duplicate_strategy_labels_are_refused() -> None:
    with pytest.raises(ConfigError, match="distinct labels"):
        load_config(QUICKSTART, ["strategies=[fedavg, fedavg]"])


def test_ray_needs_a_shared_store_and_no_local_workers() -> None:
    from amble.config import config_from_dict, trains_on_ray

    with pytest.raises(ConfigError, match="need a shared store"):
        config_from_dict({"server": {"runtime": "ray"}})
    with pytest.raises(ConfigError, match=r"set server\.workers to 0"):
        config_from_dict({"server": {"runtime": "ray", "store": "redis://h:1/0", "workers": 2}})
    with pytest.raises(ConfigError, match=r"ray\.address"):
        config_from_dict({"ray": {"address": "http://head"}})
    on_ray = config_from_dict({"server": {"runtime": "ray", "store": "redis://h:1/0"}})
    assert trains_on_ray(on_ray)
    assert not trains_on_ray(config_from_dict({}))
    assert trains_on_ray(config_from_dict({"ray": {"train": True}}))  # training on Ray, functions embedded


def test_a_missing_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from amble.raycluster import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when it is not installed
    with pytest.raises(AmbleError, match=r"pip install 'amble\[ray\]'"):
        import_ray()
