"""``[[keys]]``, ``[limits]``, ``[state]``, ``[history]``: good files parse, bad ones one line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.configfile import ConfigFileError, load
from proxy.keys import Keys, LimitSpec, digest

GOOD = """
[[keys]]
name = "team-a"
key_env = "TEAM_A_KEY"
models = ["tiny-llama"]
rpm = 60
expires = 2030-01-01

[[keys]]
name = "ops"
key_sha256 = "{}"
admin = true
metrics = true

[limits]
tpm = 1000
daily_tokens = 5000
default_max_tokens = 64

[state]
redis_url_env = "REDIS"
on_error = "closed"
timeout = 0.5
""".format(hashlib.sha256(b"ops-key").hexdigest())


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return str(path)


def test_good_file(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD), {"TEAM_A_KEY": "a-key", "REDIS": "redis://h:1/0"})
    a, ops = config.keys
    assert a.name == "team-a" and a.digest == digest("a-key") and a.models == ("tiny-llama",)
    assert a.limits == LimitSpec(rpm=60) and a.expires == 1893456000.0
    assert ops.digest == digest("ops-key") and ops.admin and ops.metrics
    assert config.limits.defaults == LimitSpec(tpm=1000, daily_tokens=5000)
    assert config.limits.default_max_tokens == 64
    assert config.state.redis_url == "redis://h:1/0" and config.state.on_error == "closed"
    ring = Keys.build("e1,e2", config.keys, config.limits).ring
    assert ring.find(b"a-key").limits == LimitSpec(rpm=60, tpm=1000, daily_tokens=5000)
    assert ring.find(b"e2").name == "env-2" and ring.find(b"e2").admin
    assert ring.find(b"nope") is None


K = '[[keys]]\nname = "a"\nkey = "k"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (K + "rpm = 0", "keys[0].rpm: expected an integer >= 1, got 0"),
        (K + 'tpm = "lots"', 'keys[0].tpm: expected an integer >= 1, got "lots"'),
        (K + "rmp = 5", "keys[0].rmp: unknown key (known here:"),
        ('[[keys]]\nname = "a"\n', "keys[0]: give exactly one of key, key_env, key_sha256"),
        (K + 'key_sha256 = "' + "0" * 64 + '"', "give exactly one of key, key_env"),
        ('[[keys]]\nname = "a"\nkey = "k"\nkey_env = "X"\n', "keys[0]: give key or key_env"),
        ('[[keys]]\nname = "a"\nkey_env = "NOPE"\n', "keys[0].key_env: environment variable"),
        ('[[keys]]\nname = "a"\nkey_sha256 = "abc"\n', "keys[0].key_sha256: expected 64 hex"),
        ('[[keys]]\nname = "a b"\nkey = "k"\n', "keys[0].name: expected letters"),
        ('[[keys]]\nname = "env-1"\nkey = "k"\n', "keys[0].name: names env-1"),
        (K + K, 'keys[1].name: "a" is already the name of keys[0]'),
        (K + '[[keys]]\nname = "b"\nkey = "k"\n', "keys[1]: the same key as keys[0]"),
        (K + "models = []", "keys[0].models: must list at least one model"),
        (K + 'expires = "soon"', 'keys[0].expires: expected a date or date-time, got "soon"'),
        (K + 'admin = "yes"', 'keys[0].admin: expected true or false, got "yes"'),
        ('keys = "a"', 'keys: expected an array of tables [[keys]], got "a"'),
        ("[limits]\nmax_parallel = -1", "limits.max_parallel: expected an integer >= 1, got -1"),
        ("[limits]\nlease_seconds = 0.5", "limits.lease_seconds: expected a number in 1.0..3600"),
        ('[state]\nbackend = "etcd"', "state.backend: expected one of memory, sqlite, redis"),
        ('[state]\nbackend = "redis"', 'state.backend: backend = "redis" needs redis_url'),
        ('[state]\nredis_url = "http://x"', "state.redis_url: expected a redis://"),
        ('[state]\non_error = "maybe"', "state.on_error: expected one of open, closed"),
        ("[state]\ntimeout = 0", "state.timeout: expected a number in 0.01..10.0, got 0"),
        ("[history]\nttl_days = 0", "history.ttl_days: expected a number"),
        ("[history]\nmax_messages = 1", "history.max_messages: expected an integer in 2..100000"),
        ('[history]\nlock_seconds = "1m"', "history.lock_seconds: expected a number"),
        ("[history]\nttl = 3", "history.ttl: unknown key (known here:"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as err:
        load(path, {})
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(path + ": ") and message in line, line
    assert '"k"' not in line  # secrets are not echoed


def test_cli_refuses_a_bad_file_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, K + "rpm = 0")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--env-file", "", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: invalid configuration file: {path}: keys[0].rpm: expected an integer >= 1, got 0"
    ]
