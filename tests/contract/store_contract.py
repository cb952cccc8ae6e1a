"""The Store contract: every Store implementation must pass these (subclass and define ``make``)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from amble.server.store.base import Store


class StoreContract(ABC):
    @abstractmethod
    def make(self) -> Store:
        """A fresh, empty store."""

    def test_get_of_absent_key_is_none(self) -> None:
        store = self.make()
        assert store.get("nope") is None
        assert store.get_versioned("nope") is None

    def test_put_then_get_returns_bytes_and_versions_grow(self) -> None:
        store = self.make()
        v1 = store.put("k", b"one")
        v2 = store.put("k", b"two")
        assert store.get("k") == b"two"
        assert v2 == v1 + 1
        item = store.get_versioned("k")
        assert item is not None and item.value == b"two" and item.version == v2

    def test_compare_and_set_on_absent_key_uses_version_zero(self) -> None:
        store = self.make()
        assert store.compare_and_set("k", b"first", 0) is True
        assert store.compare_and_set("k", b"again", 0) is False
        assert store.get("k") == b"first"

    def test_compare_and_set_refuses_a_stale_version(self) -> None:
        store = self.make()
        store.put("k", b"a")
        seen = store.get_versioned("k")
        assert seen is not None
        store.put("k", b"b")  # someone else writes in between
        assert store.compare_and_set("k", b"c", seen.version) is False
        assert store.get("k") == b"b"
        latest = store.get_versioned("k")
        assert latest is not None
        assert store.compare_and_set("k", b"c", latest.version) is True
        assert store.get("k") == b"c"

    def test_version_reads_the_version_alone(self) -> None:
        store = self.make()
        assert store.version("k") == 0
        version = store.put("k", b"big value")
        assert store.version("k") == version

    def test_commit_writes_every_key_or_none(self) -> None:
        store = self.make()
        store.put("a", b"a1")
        assert store.commit({"a": (b"a2", 1), "b": (b"b1", 0)}) is True
        assert (store.get("a"), store.get("b")) == (b"a2", b"b1")
        assert (store.version("a"), store.version("b")) == (2, 1)
        assert store.commit({"a": (b"a3", 2), "b": (b"b2", 0)}) is False  # b moved on: nothing is written
        assert (store.get("a"), store.get("b")) == (b"a2", b"b1")
        assert store.keys("") == ["a", "b"]

    def test_concurrent_commits_on_a_shared_key_count_each_winner_once(self) -> None:
        store = self.make()

        def work(name: str) -> None:
            done = 0
            while done < 30:
                shared = store.get_versioned("shared")
                own = store.version(name)
                total = int(shared.value) if shared else 0
                if store.commit(
                    {"shared": (str(total + 1).encode(), shared.version if shared else 0), name: (b"x", own)}
                ):
                    done += 1

        threads = [threading.Thread(target=work, args=(f"own{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.get("shared") == b"90"
        assert [store.version(f"own{i}") for i in range(3)] == [30, 30, 30]

    def test_delete_removes_and_ignores_absent(self) -> None:
        store = self.make()
        store.put("k", b"v")
        store.delete("k")
        store.delete("never-there")
        assert store.get("k") is None

    def test_counters_start_at_zero_and_add(self) -> None:
        store = self.make()
        assert store.counter("c") == 0
        assert store.incr("c") == 1
        assert store.incr("c", 2.5) == 3.5
        assert store.counter("c") == 3.5

    def test_sets_report_new_members_once(self) -> None:
        store = self.make()
        assert store.add_to_set("s", "a") is True
        assert store.add_to_set("s", "a") is False
        assert store.add_to_set("s", "b") is True
        assert store.set_members("s") == {"a", "b"}
        assert store.set_members("empty") == set()

    def test_a_deleted_set_is_empty_and_absent_ones_are_ignored(self) -> None:
        store = self.make()
        store.add_to_set("s", "a")
        store.put("s", b"value")  # sets and values are separate namespaces
        store.delete_set("s")
        store.delete_set("never")
        assert store.set_members("s") == set()
        assert store.get("s") == b"value"
        assert store.add_to_set("s", "a") is True

    def test_keys_by_prefix_are_sorted(self) -> None:
        store = self.make()
        for key in ("round/2", "round/1", "model/0"):
            store.put(key, b"x")
        assert store.keys("round/") == ["round/1", "round/2"]

    def test_concurrent_increments_are_not_lost(self) -> None:
        store = self.make()

        def work() -> None:
            for _ in range(200):
                store.incr("c")

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.counter("c") == 800

    def test_concurrent_compare_and_set_counts_each_winner_once(self) -> None:
        store = self.make()
        store.put("n", b"0")

        def work() -> None:
            done = 0
            while done < 50:
                item = store.get_versioned("n")
                assert item is not None
                if store.compare_and_set("n", str(int(item.value) + 1).encode(), item.version):
                    done += 1

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.get("n") == b"200"
