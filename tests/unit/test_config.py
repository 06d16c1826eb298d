from __future__ import annotations

import pytest

from proxy.config import ConfigError, Settings, parse_env_file, redact_url


def test_defaults_match_spec() -> None:
    s = Settings.from_env({}, env_file="")
    assert s.base_url == "http://localhost:8000/v1"
    assert s.model == "meta-llama/Llama-3.1-70B-Instruct"
    assert s.api_key == ""
    assert (s.host, s.port) == ("0.0.0.0", 8001)
    assert s.wrapper_api_key == ""
    assert (s.default_max_tokens, s.default_temperature) == (2048, 0.7)
    assert (s.max_retries, s.timeout) == (3, 60.0)


def test_reads_every_spec_variable() -> None:
    env = {
        "VLLM_BASE_URL": "https://example.test/v1/",
        "VLLM_MODEL": "m",
        "VLLM_API_KEY": "up",
        "VLLM_WRAPPER_HOST": "127.0.0.1",
        "VLLM_WRAPPER_PORT": "9000",
        "VLLM_WRAPPER_API_KEY": "k",
        "VLLM_DEFAULT_MAX_TOKENS": "12",
        "VLLM_DEFAULT_TEMPERATURE": "0",
        "VLLM_MAX_RETRIES": "0",
        "VLLM_TIMEOUT": "2.5",
        "VLLM_WRAPPER_CORS_ORIGINS": "https://a.test, https://b.test",
    }
    s = Settings.from_env(env, env_file="")
    assert s.base_url == "https://example.test/v1"
    assert (s.model, s.api_key, s.host, s.port, s.wrapper_api_key) == (
        "m",
        "up",
        "127.0.0.1",
        9000,
        "k",
    )
    assert (s.default_max_tokens, s.default_temperature, s.max_retries, s.timeout) == (
        12,
        0.0,
        0,
        2.5,
    )
    assert s.cors_origins == ("https://a.test", "https://b.test")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VLLM_WRAPPER_PORT", "abc"),
        ("VLLM_WRAPPER_PORT", "70000"),
        ("VLLM_TIMEOUT", "-1"),
        ("VLLM_TIMEOUT", "0"),
        ("VLLM_TIMEOUT", "nan"),
        ("VLLM_BASE_URL", "localhost:8000/v1"),
        ("VLLM_BASE_URL", "ftp://x/v1"),
        ("VLLM_BASE_URL", "http:///v1"),
        ("VLLM_BASE_URL", "http://h:99999/v1"),
        ("VLLM_MAX_RETRIES", "-1"),
        ("VLLM_DEFAULT_TEMPERATURE", "3"),
        ("VLLM_DEFAULT_MAX_TOKENS", "0"),
        ("VLLM_MODEL", ""),
        ("VLLM_WRAPPER_ACCESS_LOG", "maybe"),
        ("VLLM_WRAPPER_LOG_LEVEL", "loud"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({var: value}, env_file="")
    message = str(err.value)
    assert message.startswith(f"{var}=")
    assert "\n" not in message


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="VLLM_WRAPPER_PORT"):
        Settings(port=-5).validated()
    with pytest.raises(ConfigError, match="VLLM_BASE_URL"):
        Settings().replace(base_url="nope")


def test_env_file_is_read_and_environment_wins(tmp_path) -> None:
    f = tmp_path / ".env"
    f.write_text(
        "# comment\n"
        "VLLM_MODEL=from-file\n"
        "export VLLM_WRAPPER_PORT=9100\n"
        "VLLM_WRAPPER_API_KEY=your-service-api-key  # 可选，保护你的服务\n"
        "VLLM_API_KEY='quoted # not a comment'\n",
        encoding="utf-8",
    )
    s = Settings.from_env({"VLLM_MODEL": "from-env"}, env_file=f)
    assert s.model == "from-env"
    assert s.port == 9100
    assert s.wrapper_api_key == "your-service-api-key"
    assert s.api_key == "quoted # not a comment"


def test_env_file_can_be_named_by_variable_or_disabled(tmp_path) -> None:
    f = tmp_path / "custom.env"
    f.write_text("VLLM_MODEL=named\n")
    assert Settings.from_env({"VLLM_WRAPPER_ENV_FILE": str(f)}).model == "named"
    assert Settings.from_env({"VLLM_WRAPPER_ENV_FILE": ""}).model.startswith("meta-llama")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1", {"A": "1"}),
        ("A = 1 ", {"A": "1"}),
        ('A="x y"  # c', {"A": "x y"}),
        ("A=a#b", {"A": "a#b"}),
        ("noequals\n# A=2", {}),
        ("A=", {"A": ""}),
    ],
)
def test_parse_env_file(text: str, expected: dict[str, str]) -> None:
    assert parse_env_file(text) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@host.test/v1?key=x", "https://host.test/v1"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# ---- issue 13: settings that used to pass silently ---------------------------------------

from proxy.config import ENV_VARS, unknown_variables  # noqa: E402


@pytest.mark.parametrize("var", ["VLLM_WRAPPER_API_KEY", "VLLM_API_KEY"])
@pytest.mark.parametrize("blank", [" ", "\t", "   \n"])
def test_blank_key_is_an_error(var: str, blank: str) -> None:
    with pytest.raises(ConfigError, match=f"{var} is blank"):
        Settings.from_env({var: blank}, env_file="")


def test_empty_key_still_means_none() -> None:
    assert Settings.from_env({"VLLM_WRAPPER_API_KEY": ""}, env_file="").wrapper_api_key == ""


def test_named_env_file_must_exist(tmp_path) -> None:
    missing = tmp_path / "missing.env"
    with pytest.raises(ConfigError, match="not found"):
        Settings.from_env({}, env_file=missing)
    with pytest.raises(ConfigError, match="not found"):
        Settings.from_env({"VLLM_WRAPPER_ENV_FILE": str(missing)})


def test_env_file_read_is_recorded(tmp_path) -> None:
    f = tmp_path / "x.env"
    f.write_text("VLLM_MODEL=m\n")
    assert Settings.from_env({}, env_file=f).env_file == str(f)
    assert Settings.from_env({}, env_file="").env_file == ""


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        ("VLLM_WRAPER_API_KEY", "did you mean VLLM_WRAPPER_API_KEY?"),
        ("VLLM_TIMOUT", "did you mean VLLM_TIMEOUT?"),
        ("VLLM_WRAPPER_NOPE_NOPE_NOPE", "ignored (python -m proxy --help lists them)"),
        ("VLLM_RPC_TIMEOUT", None),  # vLLM's own
        ("VLLM_WRAPPER_MODAL_CPU", None),  # modal_app.py's
        ("VLLM_WRAPPER_ENV_FILE", None),
        ("VLLM_MODEL", None),
        ("HOME", None),
    ],
)
def test_unknown_variables(name: str, warning: str | None) -> None:
    warnings = unknown_variables({name: "1"})
    if warning is None:
        assert warnings == []
    else:
        (line,) = warnings
        assert line.startswith(f"unknown setting {name} ignored") and line.endswith(warning)


def test_every_variable_has_a_meaning_and_a_default() -> None:
    for var, spec in ENV_VARS.items():
        assert spec.meaning, var
        assert spec.default_text(), var
    assert ENV_VARS["VLLM_WRAPPER_PORT"].default_text() == "8001"
    assert ENV_VARS["VLLM_TIMEOUT"].default_text() == "60"
    assert ENV_VARS["VLLM_WRAPPER_API_KEY"].default_text() == "empty"
    assert ENV_VARS["VLLM_WRAPPER_DOCS"].default_text() == "true"
