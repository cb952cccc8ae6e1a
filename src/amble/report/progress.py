"""Whether a run's rounds made progress, read from its summary alone (``amble run`` and ``amble serve``).

A round *fails* when fewer than the quorum of its devices' updates were counted by its deadline: the
model stays where it was and the next round starts from it. A few failed rounds are an outcome worth a
warning (a dropout-heavy fleet, a deadline too tight); a run in which the model never moved past the
first round made no progress at all, whatever its accuracy says, and must not end as a success.

The rule: a strategy **stalled** when it finalized fewer than two of its rounds (none of a one-round
run), that is, its model moved at most once. ``amble run`` and ``amble serve`` then exit with
:data:`STALLED_EXIT_STATUS` once every file is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STALLED_EXIT_STATUS = 3
"""The exit status of ``amble run`` / ``amble serve`` when a strategy stalled (2 is a usage error)."""


def _counts(result: Mapping[str, Any]) -> tuple[int, int]:
    """(rounds played, rounds failed) of one strategy's summary entry."""
    rounds, failed = result.get("rounds"), result.get("rounds_failed")
    rounds = rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else 0
    failed = failed if isinstance(failed, int) and not isinstance(failed, bool) else 0
    return rounds, failed


def stalled(result: Mapping[str, Any]) -> bool:
    """True when at most one round published a model (none of a one-round run): see the module's docstring."""
    rounds, failed = _counts(result)
    return rounds - failed < min(rounds, 2)


def failed_rounds_warnings(strategies: Mapping[str, Mapping[str, Any]], rows_file: str) -> list[str]:
    """One line per strategy with failed rounds, saying how many and whether the run stalled."""
    lines = []
    for label, result in strategies.items():
        rounds, failed = _counts(result)
        if failed == 0:
            continue
        line = (
            f"strategy {label}: {failed} of {rounds} rounds failed (fewer than the quorum of updates counted by "
            f"the round's deadline; the model stayed where it was); see {rows_file}"
        )
        if stalled(result):
            line += ". At most one round published a model: the run made no progress"
        lines.append(line)
    return lines
