from __future__ import annotations

import pytest

from proxy.sim.faults import FaultError, FaultState


def test_fail_next_applies_n_times_then_stops() -> None:
    state = FaultState()
    state.configure({"fail_next": 2, "status": 503, "retry_after": 2})
    first, second, third = (state.take({}) for _ in range(3))
    assert (first.fail_status, first.retry_after) == (503, "2")
    assert second.fail_status == 503
    assert third.fail_status is None
    assert state.snapshot()["fail_next"] == 0


def test_fail_body_is_raw_bytes() -> None:
    state = FaultState()
    state.configure({"fail_next": 1, "status": 500, "body": "oops"})
    assert state.take({}).fail_body == b"oops"


def test_stream_faults_skip_non_streaming_requests() -> None:
    state = FaultState()
    state.configure({"drop_after_chunks": 3, "stall_after_chunks": 1, "stall_seconds": 2})
    unary = state.take({})
    state.take_generation(unary, stream=False)
    assert unary.drop_after is None and unary.stall_after is None
    streamed = state.take({})
    state.take_generation(streamed, stream=True)
    assert streamed.drop_after == 3
    assert (streamed.stall_after, streamed.stall_seconds) == (1, 2.0)
    again = state.take({})
    state.take_generation(again, stream=True)
    assert again.drop_after is None


def test_count_applies_to_each_named_fault() -> None:
    state = FaultState()
    state.configure({"first_byte_delay": 0.5, "garbage": True, "count": 2})
    delays = [state.take({}).first_byte_delay for _ in range(3)]
    assert delays == [0.5, 0.5, 0.0]
    flags = []
    for _ in range(3):
        f = state.take({})
        state.take_generation(f, stream=False)
        flags.append(f.garbage)
    assert flags == [True, True, False]


def test_headers_override_per_request() -> None:
    state = FaultState()
    f = state.take(
        {
            b"x-sim-fail-status": b"429",
            b"x-sim-retry-after": b"1",
            b"x-sim-first-byte-delay": b"0.25",
            b"x-sim-token-delay": b"0.01",
            b"x-sim-tokens": b"7",
            b"x-sim-drop-after": b"4",
        }
    )
    assert (f.fail_status, f.retry_after) == (429, "1")
    assert f.first_byte_delay == 0.25
    assert f.token_delay == 0.01
    assert f.tokens == 7
    assert f.drop_after == 4
    # a header-set drop is not replaced by (nor consumes) a global one
    state.configure({"drop_after_chunks": 9})
    state.take_generation(f, stream=True)
    assert f.drop_after == 4
    assert state.snapshot()["drop_after_chunks"]["count"] == 1


def test_bad_header_values_are_ignored() -> None:
    f = FaultState().take({b"x-sim-tokens": b"lots", b"x-sim-token-delay": b"-1"})
    assert f.tokens is None and f.token_delay is None


@pytest.mark.parametrize(
    "spec",
    [
        {"fail_nxt": 1},
        {"fail_next": "two"},
        {"first_byte_delay": -1},
        {"garbage": True, "count": 0},
    ],
)
def test_invalid_specs_rejected(spec: dict) -> None:
    with pytest.raises(FaultError):
        FaultState().configure(spec)


def test_reset_clears_everything() -> None:
    state = FaultState()
    state.configure({"fail_next": 5, "drop_after_chunks": 1, "garbage": True})
    state.reset()
    f = state.take({})
    state.take_generation(f, stream=True)
    assert f.fail_status is None and f.drop_after is None and not f.garbage
