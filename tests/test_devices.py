"""trainer.devices read by one parser for both `deepres submit` and the strategy checks."""

from __future__ import annotations

import pytest

from deepres.devices import Devices, parse_devices
from deepres.errors import ConfigError
from deepres.slurm.submit import ClusterRequest, ProcessLayout, plan
from deepres.strategies.settings import device_indices, processes


@pytest.mark.parametrize(("devices", "expected"), [
    (2, Devices(2)), ("2", Devices(2)), (" 3 ", Devices(3)),
    ("auto", Devices(None)), (-1, Devices(None)), ("-1", Devices(None)),
    ([0, 3], Devices(2, (0, 3))), ((1,), Devices(1, (1,))), ("0,3", Devices(2, (0, 3))), ("1,", Devices(1, (1,))),
])
def test_parse_devices_reads_counts_auto_and_indices(devices, expected):
    assert parse_devices(devices) == expected


@pytest.mark.parametrize("devices", ["two", -2, True, [0, "x"], "0,a", 1.5])
def test_parse_devices_refuses_what_is_not_a_device_spec(devices):
    with pytest.raises(ConfigError, match="trainer.devices"):
        parse_devices(devices)


def test_submit_and_strategies_agree_on_the_count():
    for devices, per_node in (("0,3", 2), ([0, 1, 2], 3), (4, 4), ("auto", None)):
        checked = plan(ClusterRequest(nodes=2), ProcessLayout(devices=devices, num_nodes=2, accelerator="cpu"))
        assert checked.tasks_per_node == (per_node or 1)
        assert processes({"devices": devices, "num_nodes": 2}) == 2 * (per_node or 1)
    assert device_indices("0,3") == [0, 3] and device_indices(4) is None and device_indices(None) is None
