"""``[[upstreams]]`` and ``[routing]``: what they accept, and each error's one line."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, Settings
from proxy.configfile import ConfigFileError, RoutingSpec, UpstreamSpec, load

GOOD = """
[[upstreams]]
url = "http://10.0.0.1:8000/v1"
weight = 3
models = ["big"]
max_connections = 50
api_key_env = "BIG_KEY"

[[upstreams]]
url = "http://10.0.0.2:8000/v1/"

[routing]
policy = "session"
session_header = "X-Conversation"
probe_interval = 2
"""


def test_a_complete_file_parses(tmp_path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(GOOD)
    config = load(path, environ={"BIG_KEY": "sk-big"})
    assert config.upstreams == (
        UpstreamSpec(
            url="http://10.0.0.1:8000/v1",
            api_key="sk-big",
            weight=3,
            models=("big",),
            max_connections=50,
        ),
        UpstreamSpec(url="http://10.0.0.2:8000/v1"),
    )
    assert config.routing == RoutingSpec(
        policy="session", session_header="x-conversation", probe_interval=2.0
    )


BAD = [
    ("[[upstreams]]\nweight = 2\n", "gw.toml: upstreams[0].url: is required"),
    (
        '[[upstreams]]\nurl = "http://a:1/v1"\n[[upstreams]]\nurl = "http://b:1/v1"\nweight = 0\n',
        "gw.toml: upstreams[1].weight: expected an integer in 1..1000, got 0",
    ),
    (
        '[[upstreams]]\nurl = "ftp://a/v1"\n',
        'gw.toml: upstreams[0].url: expected an http:// or https:// URL, got "ftp://a/v1"',
    ),
    (
        '[[upstreams]]\nurl = "http://a:1/v1"\nmodel = ["x"]\n',
        "gw.toml: upstreams[0].model: unknown key (known here: api_key, api_key_env, "
        "max_connections, models, url, weight)",
    ),
    (
        '[[upstreams]]\nurl = "http://a:1/v1"\nmodels = "x"\n',
        'gw.toml: upstreams[0].models: expected an array of strings, got "x"',
    ),
    (
        '[[upstreams]]\nurl = "http://a:1/v1"\napi_key_env = "NOPE_NOT_SET"\n',
        "gw.toml: upstreams[0].api_key_env: environment variable NOPE_NOT_SET is not set or empty",
    ),
    (
        '[[upstreams]]\nurl = "http://u:secret@a:1/v1"\napi_key = "k"\n',
        "gw.toml: upstreams[0].url: http://a:1/v1 carries credentials and api_key is set; "
        "both would claim the Authorization header, give one",
    ),
    (
        '[[upstreams]]\nurl = "http://a:1/v1"\n[[upstreams]]\nurl = "http://a:1/v1/"\n',
        "gw.toml: upstreams[1].url: http://a:1/v1 is listed twice",
    ),
    (
        '[upstreams]\nurl = "http://a:1/v1"\n',
        "gw.toml: upstreams: expected an array of tables [[upstreams]], got a table",
    ),
    (
        '[routing]\npolicy = "fastest"\n',
        "gw.toml: routing.policy: expected one of least-busy, round-robin, session, "
        'load-aware, got "fastest"',
    ),
    (
        "[routing]\nprobe_interval = 0\n",
        "gw.toml: routing.probe_interval: expected a number >= 0.1, got 0",
    ),
    (
        "[routing]\neject_backoff = 10\neject_backoff_max = 5\n",
        "gw.toml: routing.eject_backoff_max: must be >= eject_backoff",
    ),
    (
        '[routing]\nsession_header = "x session"\n',
        'gw.toml: routing.session_header: expected a header name, got "x session"',
    ),
    ("[routing]\npolcy = 'round-robin'\n", "gw.toml: routing.polcy: unknown key"),
    ("[[upstream]]\nurl = 'http://a:1/v1'\n", "gw.toml: upstream: unknown key"),
    ("[[upstreams]\n", "gw.toml: invalid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_each_bad_file_gives_its_one_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as info:
        load(path, environ={})
    line = str(info.value).replace(str(tmp_path) + "/", "")
    assert "\n" not in line
    assert line.startswith(message), line
    assert "secret" not in line


def test_base_url_lists_several_upstreams() -> None:
    settings = Settings.from_mapping({"VLLM_BASE_URL": "http://a:1/v1, http://b:2/v1/"})
    assert settings.base_urls == ("http://a:1/v1", "http://b:2/v1")
    with pytest.raises(ConfigError, match="listed twice"):
        Settings.from_mapping({"VLLM_BASE_URL": "http://a:1/v1,http://a:1/v1"})


def test_credentials_in_the_url_and_an_api_key_refused_without_showing_them() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(
            {"VLLM_BASE_URL": "http://user:hunter2@127.0.0.1:9/v1", "VLLM_API_KEY": "sk-x"}
        )
    text = str(info.value)
    assert "VLLM_BASE_URL" in text and "Authorization" in text
    assert "hunter2" not in text and "sk-x" not in text
    ok = Settings.from_mapping({"VLLM_BASE_URL": "http://user:hunter2@127.0.0.1:9/v1"})
    assert ok.public_base_url == "http://127.0.0.1:9/v1"


def test_connect_timeout_setting() -> None:
    assert Settings().connect_timeout == 3.0
    assert Settings.from_mapping({"VLLM_WRAPPER_CONNECT_TIMEOUT": "0.5"}).connect_timeout == 0.5
    with pytest.raises(ConfigError, match="VLLM_WRAPPER_CONNECT_TIMEOUT"):
        Settings.from_mapping({"VLLM_WRAPPER_CONNECT_TIMEOUT": "0"})
