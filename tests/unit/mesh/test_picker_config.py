"""The ``endpoint_picker`` section of the router configuration."""

from __future__ import annotations

import pytest

from mesh.config import ConfigError, build, load
from mesh.picker_config import PickerConfig


def test_absent_means_no_picker_and_true_means_defaults() -> None:
    assert build({"region": "us"}).endpoint_picker is None
    assert build({"region": "us", "endpoint_picker": False}).endpoint_picker is None
    assert build({"region": "us", "endpoint_picker": True}).endpoint_picker == PickerConfig()
    assert build({"region": "us", "endpoint_picker": {}}).endpoint_picker == PickerConfig()


def test_every_key_is_read() -> None:
    pc = build({"region": "us", "endpoint_picker": {
        "listen": "127.0.0.1:9100", "fallbacks": 2, "remote": False,
        "priority_header": "X-Prio", "shed_below": 5, "mark_down_statuses": [503],
        "dest_namespace": "ns", "subset_namespace": "hint", "max_body": 10}}).endpoint_picker
    assert pc == PickerConfig("127.0.0.1:9100", 2, False, "x-prio", 5, (503,), "ns", "hint", 10)
    assert (pc.host, pc.port) == ("127.0.0.1", 9100)


def test_environment_variable_holds_the_section_as_yaml() -> None:
    cfg = load(None, env={"KVMESH_REGION": "us",
                          "KVMESH_ENDPOINT_PICKER": "{listen: '0.0.0.0:9002', fallbacks: 1}"})
    assert cfg.endpoint_picker == PickerConfig(fallbacks=1)


@pytest.mark.parametrize(("section", "key"), [
    ("yes please", "endpoint_picker"),
    ({"port": 1}, "endpoint_picker.port"),
    ({"listen": "nowhere"}, "endpoint_picker.listen"),
    ({"fallbacks": -1}, "endpoint_picker.fallbacks"),
    ({"fallbacks": True}, "endpoint_picker.fallbacks"),
    ({"remote": "no"}, "endpoint_picker.remote"),
    ({"shed_below": "low"}, "endpoint_picker.shed_below"),
    ({"mark_down_statuses": 503}, "endpoint_picker.mark_down_statuses"),
    ({"mark_down_statuses": [50]}, "endpoint_picker.mark_down_statuses[0]"),
    ({"priority_header": ""}, "endpoint_picker.priority_header"),
])
def test_bad_values_name_their_key(section: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build({"region": "us", "endpoint_picker": section})
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
