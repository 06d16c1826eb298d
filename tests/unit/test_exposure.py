from __future__ import annotations

from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.body import check_head
from proxy.config import ConfigError, Settings
from proxy.errors import (
    BadRequest,
    Forbidden,
    HeadersTooLarge,
    MethodNotAllowed,
    NotFound,
    URITooLong,
)
from proxy.exposure import Exposure


@pytest.mark.parametrize(
    "sub",
    [
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/models",
        "/models/tiny-llama",
        "/models/",
        "/responses",
        "/responses/resp_123",
        "/responses/resp_123/cancel",
        "/score",
        "/rerank",
        "/chat/completions/",
    ],
)
def test_inference_paths_are_allowed(sub: str) -> None:
    assert Exposure().check("POST", sub) is None


@pytest.mark.parametrize(
    "sub",
    ["/nope", "/metrics", "//chat/completions", "/chat//completions", "/", "", "/x/y"],
)
def test_other_paths_are_404(sub: str) -> None:
    assert isinstance(Exposure().check("GET", sub), NotFound)


def test_wildcard_matches_exactly_one_non_empty_segment() -> None:
    e = Exposure()
    assert e.check("GET", "/models/a") is None
    assert isinstance(e.check("GET", "/models/a/b"), NotFound)
    assert isinstance(e.check("GET", "/responses//cancel"), NotFound)


def test_admin_paths_are_403_unless_allowed() -> None:
    for sub in ("/load_lora_adapter", "/unload_lora_adapter", "/load_lora_adapter/"):
        assert isinstance(Exposure().check("POST", sub), Forbidden)
        assert isinstance(Exposure(proxy_all=True).check("POST", sub), Forbidden)
        assert Exposure(allow_admin=True).check("POST", sub) is None


def test_extra_paths_and_proxy_all_widen_the_list() -> None:
    assert isinstance(Exposure().check("POST", "/messages"), NotFound)
    assert Exposure(["/messages", "/files/*"]).check("POST", "/messages") is None
    assert Exposure(["/files/*"]).check("GET", "/files/f1") is None
    assert Exposure(proxy_all=True).check("GET", "/anything/at/all") is None
    assert Exposure(proxy_all=True).check("PATCH", "/models") is None


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PUT", "PATCH", "PROPFIND"])
def test_unusual_methods_are_405(method: str) -> None:
    problem = Exposure().check(method, "/models")
    assert isinstance(problem, MethodNotAllowed)
    assert (b"allow", b"DELETE, GET, HEAD, OPTIONS, POST") in problem.headers


@pytest.mark.parametrize("sub", ["/../health", "/./models", "/models/..", "/a/../../b", "/m\x00"])
def test_dot_segments_and_nul_are_400_even_with_proxy_all(sub: str) -> None:
    assert isinstance(Exposure(proxy_all=True).check("GET", sub), BadRequest)


@given(st.text(max_size=60), st.sampled_from(["GET", "POST", "TRACE", "DELETE"]))
def test_check_never_lets_a_dot_segment_or_unlisted_path_through(sub: str, method: str) -> None:
    exposure = Exposure()
    problem = exposure.check(method, sub)
    if problem is None:
        segments = sub.split("/")
        assert ".." not in segments and "." not in segments and "\x00" not in sub
        assert exposure.allows(sub)
        # What is relayed decodes back to the path that was checked.
        assert unquote(quote(sub, safe="/:@!$&'()*+,;=-._~")) == sub
    else:
        assert 400 <= problem.status < 500


def test_settings_for_exposure() -> None:
    s = Settings.from_mapping(
        {"VLLM_WRAPPER_EXTRA_PATHS": "/messages, /files/*", "VLLM_WRAPPER_PROXY_ALL": "true"}
    )
    assert s.extra_paths == ("/messages", "/files/*")
    assert s.proxy_all is True
    for bad in ("messages", "/a/../b"):
        with pytest.raises(ConfigError, match="VLLM_WRAPPER_EXTRA_PATHS"):
            Settings.from_mapping({"VLLM_WRAPPER_EXTRA_PATHS": bad})
    with pytest.raises(ConfigError, match="VLLM_WRAPPER_MAX_HEADER_BYTES"):
        Settings.from_mapping({"VLLM_WRAPPER_MAX_HEADER_BYTES": "10"})


def test_check_head_limits() -> None:
    scope = {"headers": [(b"x", b"a" * 100)], "raw_path": b"/v1/models", "query_string": b""}
    check_head(scope, limit=1024)
    with pytest.raises(HeadersTooLarge):
        check_head(scope, limit=100)
    scope = {"headers": [], "raw_path": b"/v1/models", "query_string": b"q=" + b"a" * 2000}
    with pytest.raises(URITooLong):
        check_head(scope, limit=1024)
