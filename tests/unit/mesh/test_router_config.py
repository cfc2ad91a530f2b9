"""Router configuration: file, environment and flags, and one clear error per bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.router import overrides, register
from mesh.config import ConfigError, build, load

GOOD = """
region: us
listen: 127.0.0.1:8100
engines:
  - {url: http://127.0.0.1:8001, kv_events: tcp://127.0.0.1:5557, replay: tcp://127.0.0.1:5558}
  - url: http://127.0.0.1:8002/
    kv_events: redis://127.0.0.1:6379/0
peers: [http://127.0.0.1:8100, http://127.0.0.1:8200]
mesh_key: ${TEST_MESH_KEY}
policy: skylb
policy_params: {tau: 5}
tokenizer: builtin
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "router.yaml"
    p.write_text(text)
    return str(p)


def test_file_is_read_with_env_interpolation_and_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD), env={"TEST_MESH_KEY": "k" * 32})
    assert cfg.region == "us" and cfg.port == 8100 and cfg.host == "127.0.0.1"
    assert cfg.engines[1].url == "http://127.0.0.1:8002"  # trailing slash dropped
    assert cfg.engines[0].replay == "tcp://127.0.0.1:5558"
    assert cfg.engines[1].kv_events == "redis://127.0.0.1:6379/0"
    assert cfg.mesh_key == "k" * 32
    assert cfg.policy == "skylb" and cfg.policy_params == {"tau": 5}
    assert cfg.advertise == "http://127.0.0.1:8100"
    assert cfg.node_id.startswith("us-")


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    env = {"TEST_MESH_KEY": "k" * 32, "KVMESH_REGION": "eu", "KVMESH_PEERS": "http://a:1,http://b:2",
           "KVMESH_POLICY": "kvmesh", "KVMESH_POLICY_PARAMS": '{"prefill_rate": 5000}'}
    cfg = load(path, env=env)
    assert cfg.region == "eu" and cfg.peers == ("http://a:1", "http://b:2")
    assert cfg.policy == "kvmesh" and cfg.policy_params == {"prefill_rate": 5000}
    cfg = load(path, {"region": "asia", "listen": "0.0.0.0:9000"}, env=env)
    assert cfg.region == "asia" and cfg.port == 9000


def test_flags_parse_engines_policy_params_and_rtts() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser)
    args = parser.parse_args([
        "--region", "us", "--engine", "http://e1:8000,tcp://e1:5557,tcp://e1:5558",
        "--engine", "http://e2:8000", "--policy", "kvmesh", "--policy-param", "tie_rel=0.2",
        "--emulate-rtt", "eu=0.08",
    ])
    cfg = build({**overrides(args), "mesh_key": "k" * 16})
    assert [e.url for e in cfg.engines] == ["http://e1:8000", "http://e2:8000"]
    assert cfg.engines[0].kv_events == "tcp://e1:5557" and cfg.engines[1].kv_events is None
    assert cfg.policy_params == {"tie_rel": 0.2}
    assert cfg.emulate_rtt == {"eu": 0.08}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({}, "region"),
        ({"region": "us", "listen": "8000"}, "listen"),
        ({"region": "us", "engines": [{"kv_events": "tcp://x:1"}]}, "engines[0].url"),
        ({"region": "us", "engines": [{"url": "ftp://x"}]}, "engines[0].url"),
        ({"region": "us", "engines": [{"url": "http://x:1", "kv_events": "udp://x"}]},
         "engines[0].kv_events"),
        ({"region": "us", "engines": [{"url": "http://x:1", "port": 3}]}, "engines[0].port"),
        ({"region": "us", "engines": ["http://x:1", "http://x:1"]}, "engines[1].url"),
        ({"region": "us", "peers": ["not a url"], "mesh_key": "k" * 16}, "peers[0]"),
        ({"region": "us", "policy": "best"}, "policy"),
        ({"region": "us", "policy": "kvmesh", "policy_params": {"tie_rel": -1}},
         "policy.tie_rel"),
        ({"region": "us", "block_size": 0}, "block_size"),
        ({"region": "us", "max_attempts": "two"}, "max_attempts"),
        ({"region": "us", "emulate_rtt": {"eu": "far"}}, "emulate_rtt.eu"),
        ({"region": "us", "tokenizer": "sentencepiece"}, "tokenizer"),
        ({"region": "us", "tokenizer": "engine:ftp://x"}, "tokenizer"),
        ({"region": "us", "colour": "blue"}, "colour"),
        ({"region": "us", "mesh_key": "short"}, "mesh_key"),
        ({"region": "us", "peers": ["http://a:1"]}, "mesh_key"),
    ],
)
def test_every_bad_key_is_named(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(raw)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_missing_env_reference_is_an_error_on_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^mesh_key: environment variable TEST_MESH_KEY"):
        load(write(tmp_path, GOOD), env={})


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "region: us\nengines: [{url: http://x:1, kv_events: nope}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "router", "--config", path],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "engines[0].kv_events" in lines[0]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[3] / "deploy" / "examples")
                                        .glob("*.yaml")))
def test_every_shipped_example_is_valid(path: Path) -> None:
    cfg = load(str(path), env={"KVMESH_MESH_KEY": "an example key of 32 bytes......"})
    assert cfg.region and cfg.engines


def test_mesh_key_list_rotates_first_signs_all_accepted() -> None:
    cfg = build({"region": "us", "mesh_key": ["n" * 16, "o" * 16]})
    assert cfg.mesh_key == "n" * 16
    assert cfg.mesh_keys == ("n" * 16, "o" * 16)
    with pytest.raises(ConfigError, match=r"^mesh_key\[1\]: must be at least"):
        build({"region": "us", "mesh_key": ["n" * 16, "short"]})
    with pytest.raises(ConfigError, match=r"^mesh_key: an empty list"):
        build({"region": "us", "mesh_key": []})


def test_edge_keys_are_validated() -> None:
    from mesh.config import ConfigError, build

    c = build({"region": "us", "api_keys": [{"key": "k" * 20, "name": "a", "rate": 2}],
               "first_byte_timeout": 5, "header_timeout": 2, "max_body_bytes": 1024})
    assert c.api_keys[0].name == "a" and c.api_keys[0].rate == 2.0
    assert (c.first_byte_timeout, c.header_timeout, c.max_body_bytes) == (5.0, 2.0, 1024)
    for raw, key in [
        ({"api_keys": ["short"]}, "api_keys[0].key"),
        ({"api_keys": [{"key": "k" * 20, "rps": 1}]}, "api_keys[0].rps"),
        ({"tls_cert": "/no/such/file.pem"}, "tls_cert"),
        ({"tls_peer_mtls": True}, "tls_peer_mtls"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"engines": [{"url": "http://e:1", "first_byte_timeout": -1}]},
         "engines[0].first_byte_timeout"),
    ]:
        try:
            build({"region": "us", **raw})
        except ConfigError as exc:
            assert exc.key == key, (raw, exc)
        else:
            raise AssertionError(f"{raw} accepted")


def test_workers_is_a_bounded_count_from_file_environment_or_flag(tmp_path: Path) -> None:
    base = {"region": "us"}
    assert build(base).workers == 1
    assert build({**base, "workers": 4}).workers == 4
    for bad in (0, 65, "many", 2.5, True):
        with pytest.raises(ConfigError, match=r"^workers: "):
            build({**base, "workers": bad})
    path = tmp_path / "r.yaml"
    path.write_text("region: us\nworkers: 2\n")
    assert load(str(path), env={"KVMESH_WORKERS": "3"}).workers == 3
    import argparse

    parser = argparse.ArgumentParser()
    register(parser)
    args = parser.parse_args(["--workers", "5"])
    assert load(str(path), overrides(args), env={}).workers == 5
