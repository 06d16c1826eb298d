"""The configuration file reader: key paths, types, secrets, unknown keys in one-line errors."""

from __future__ import annotations

import pytest

from proxy.configfile import ConfigFileError, Table, load


def table(data: dict, environ: dict | None = None) -> Table:
    return Table(data, file="gw.toml", path="keys[2]", environ=environ or {})


@pytest.mark.parametrize(
    ("data", "read", "message"),
    [
        (
            {"rpm": "sixty"},
            lambda t: t.int("rpm", lo=1),
            'gw.toml: keys[2].rpm: expected an integer >= 1, got "sixty"',
        ),
        (
            {"rpm": 0},
            lambda t: t.int("rpm", lo=1),
            "gw.toml: keys[2].rpm: expected an integer >= 1, got 0",
        ),
        (
            {"rpm": True},
            lambda t: t.int("rpm", lo=1),
            "gw.toml: keys[2].rpm: expected an integer >= 1, got true",
        ),
        ({}, lambda t: t.str("name"), "gw.toml: keys[2].name: is required"),
        ({"name": " "}, lambda t: t.str("name"), "gw.toml: keys[2].name: must not be empty"),
        (
            {"w": 1e400},
            lambda t: t.float("w", lo=0),
            "gw.toml: keys[2].w: expected a number >= 0, got inf",
        ),
        (
            {"p": "fast"},
            lambda t: t.choice("p", ("a", "b")),
            'gw.toml: keys[2].p: expected one of a, b, got "fast"',
        ),
        (
            {"m": ["a", 3]},
            lambda t: t.str_list("m"),
            "gw.toml: keys[2].m[1]: expected a non-empty string, got 3",
        ),
        (
            {"key": "k", "key_env": "K"},
            lambda t: t.secret("key"),
            "gw.toml: keys[2]: give key or key_env, not both",
        ),
        (
            {"key_env": "NOPE"},
            lambda t: t.secret("key"),
            "gw.toml: keys[2].key_env: environment variable NOPE is not set or empty",
        ),
        (
            {},
            lambda t: t.secret("key", required=True),
            "gw.toml: keys[2]: key or key_env is required",
        ),
    ],
)
def test_errors_name_file_path_and_problem(data, read, message):
    with pytest.raises(ConfigFileError) as err:
        read(table(data))
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_values_and_defaults():
    t = table({"rpm": 60, "w": 2, "m": ["a"], "key_env": "K"}, {"K": " s3cret "})
    assert t.int("rpm", lo=1) == 60
    assert t.int("tpm", None) is None
    assert t.float("w", lo=0) == 2.0
    assert t.str_list("m") == ("a",)
    assert t.secret("key") == "s3cret"
    t.done()


def test_unknown_key_is_an_error():
    t = table({"rpm": 1, "rmp": 2})
    t.int("rpm")
    with pytest.raises(ConfigFileError, match=r"keys\[2\]\.rmp: unknown key \(known here: rpm\)"):
        t.done()


def test_load_reports_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigFileError, match=r"nope\.toml: no such file"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[routing\n")
    with pytest.raises(ConfigFileError, match=r"bad.toml: invalid TOML: .*line 1"):
        load(bad)
    unknown = tmp_path / "u.toml"
    unknown.write_text("[nosuch]\nx = 1\n")
    with pytest.raises(ConfigFileError, match=r"u\.toml: nosuch: unknown key"):
        load(unknown)


def test_request_json_body_is_parsed_once():
    from proxy.accesslog import RequestInfo

    info = RequestInfo(b"rid")
    assert info.json_body(b'{"model": "m"}') == {"model": "m"}
    assert info.json_body(b"ignored: parsed once") == {"model": "m"}
    assert RequestInfo(b"r").json_body(b"[1]") is None
    assert RequestInfo(b"r").json_body(b"{bad") is None
