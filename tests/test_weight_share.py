"""``server.max_weight_share`` holds when a round's weights are fixed, not only at registration (issue 22,
item 4), over real loopback HTTP with the embedded server.

At registration the share is checked once ``devices_per_round`` other devices have registered, so a
device that registers first is never checked; the coordinator checks every registered count again
when it starts a round and leaves a device over the share out of it, with the reason in the round's
record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from amble.config import config_from_dict
from amble.live.coordinator import Coordinator, SampleLimits
from amble.live.serve import prepare
from amble.server.tensors import decode, encode
from amble.strategies.base import Plan, Report
from tests.test_gateway import assert_error, post_update, update_for
from tests.test_hostile_devices import serving, small
from tests.test_hostile_reports import amble, make_server

SHARE = 0.5
NUDGE = 2.0**-10  # what the big device adds to every float of the model: exact in float32


def test_a_device_that_registered_first_gets_no_more_than_max_weight_share_of_the_aggregate(tmp_path: Path) -> None:
    # Prepare: six devices, all selected (devices_per_round 6); device 0 registers 100,000 samples before
    # the five others register 100 each: 100,000 / 100,500 = 99.5% of all registered samples.
    raw = small(num_devices=6, per_round=6, rounds=1)
    raw["server"] = {"device_data": "own", "max_samples": 100_000, "max_weight_share": SHARE}
    served = prepare(config_from_dict(raw), tmp_path, round_timeout_s=60)
    with serving(served) as gw:
        counts = {0: 100_000, **dict.fromkeys(range(1, 6), 100)}
        for device, count in counts.items():  # device 0 first: no total to compare it with yet
            response = gw.client(device).post("/v1/register", json={"num_samples": count})
            assert response.status_code == 200, response.text
        state = gw.wait_round(0)
        before = decode(gw.model_bytes())

        # Execute: device 0 sends a nudge of every float (with its own plan, had it one); the others zeros.
        plan = Plan.from_dict(state["plans"].get("0") or state["plans"][str(state["expected"][0])])
        report = Report(0, 0, counts[0], plan.local_steps, plan.batch_size, 0.5, 0.1, 0.1)
        nudge = {k: torch.full_like(v, NUDGE) for k, v in before.items() if v.is_floating_point()}
        big = post_update(gw, 0, 0, encode(nudge), json.dumps(report.to_dict()))
        for device in state["expected"]:
            if device != 0:
                body, header = update_for(gw, device, 0, state["plans"][str(device)])
                assert post_update(gw, device, 0, body, header).status_code == 202
        waited = time.monotonic() + 60
        while not served.coordinator.history and time.monotonic() < waited:  # a wait, not a timed assertion
            time.sleep(0.02)
        after = decode(gw.model_bytes())

    # Assert: device 0's weight share of the round's aggregate is the move of a nudged float over the nudge
    record = served.coordinator.history[0]
    share = max(float((after[k].double() - before[k].double()).abs().max()) / NUDGE for k in nudge)
    assert share <= SHARE
    assert share == 0.0  # it was left out: the five zeros moved nothing
    assert (record.status, sorted(int(d) for d in state["expected"])) == ("finalized", [1, 2, 3, 4, 5])
    assert list(record.excluded) == ["0"]
    assert "99.5% of all registered samples, over server.max_weight_share (50%)" in record.excluded["0"]
    assert "register fewer" in record.excluded["0"]
    assert_error(big, 403, "not_selected")


def test_a_fleet_too_small_to_meet_the_share_evenly_is_not_shut_out_of_its_rounds() -> None:
    server = make_server(amble())
    coordinator = Coordinator(
        server, 2, 2, 30, limits=SampleLimits("own", 100_000, 0.5, 10)
    )  # registration checks nothing
    for device, count in ((0, 100), (1, 101)):
        coordinator.register(device, count)

    two = coordinator._selectable([0, 1])  # 101 of 201 is 50.2%, but two devices cannot both be under 50%

    coordinator.register(2, 400)
    three = coordinator._selectable([0, 1, 2])  # 400 of 601: 66.6% with room for the share

    assert two == ([0, 1], {})
    assert three[0] == [0, 1] and "66.6% of all registered samples" in three[1][2]
