"""Call logs: one line per call, structured in JSON mode, and refused streams are logged and counted."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest

from istioctl_proxy import client, logs

from . import ads_client
from .helpers import ADMIN_TOKEN, stack
from .test_metrics import ANY_PORT, eventually


@pytest.fixture
def json_log() -> io.StringIO:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.setup("info", "json")
    root.handlers[0].setStream(buf)  # type: ignore[attr-defined]
    yield buf
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


async def test_json_call_line_has_fields_and_no_token(json_log: io.StringIO) -> None:
    async with stack(2, 4) as s:
        await ads_client.request(s.target(), client.SYNCZ)
        with pytest.raises(grpc.aio.AioRpcError):
            await ads_client.request(s.target(token=""), client.SYNCZ)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    calls = [line for line in lines if line.get("type") == client.SYNCZ]
    assert calls and calls[0]["outcome"] == "OK" and calls[0]["replicas_asked"] == 2 and calls[0]["resources"] == 4
    assert calls[0]["caller"].startswith("bearer:")
    refused = [line for line in lines if line["msg"].startswith("call refused")]
    assert refused and refused[0]["outcome"] == "UNAUTHENTICATED"
    assert ADMIN_TOKEN not in json_log.getvalue()


async def test_refused_streams_are_counted() -> None:
    async with stack(1, 1, admin_listen=ANY_PORT) as s:
        with pytest.raises(grpc.aio.AioRpcError):
            await ads_client.request(s.target(token=""), client.SYNCZ)
        await eventually(s.proxy.admin_port, "istioctl_proxy_calls_total", 1.0, type_url="other",
                         outcome="UNAUTHENTICATED")


def test_text_logs_are_one_line_per_record_whatever_the_message_holds() -> None:
    """Replicas' error texts reach log messages (partial-answer warnings): they cannot forge log lines."""
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.setup("info", "text")
    root.handlers[0].setStream(buf)  # type: ignore[attr-defined]
    try:
        forged = "2026-01-01 00:00:00,000 INFO istioctl_proxy.server: call type=x caller=spiffe://evil outcome=OK"
        log = logging.getLogger("istioctl_proxy.aggregator")
        log.warning("partial answer: 10.0.0.1:15012: UNAVAILABLE: %s", f"boom\n{forged}\r\n{forged}\u2028{forged}")
        try:
            raise RuntimeError(f"bad\n{forged}")
        except RuntimeError:
            log.exception("unexpected")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(not line.startswith("2026-01-01") for line in lines)
    assert "boom\\n2026-01-01" in lines[0] and "\\u2028" in lines[0]
    assert "Traceback" in lines[1] and "RuntimeError: bad\\n2026" in lines[1]
