"""Call logs: one line per call, structured in JSON mode, and refused streams are logged and counted."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest

from istioctl_proxy import client, logs

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
        await client.request(s.target(), client.SYNCZ)
        with pytest.raises(grpc.aio.AioRpcError):
            await client.request(s.target(token=""), client.SYNCZ)
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
            await client.request(s.target(token=""), client.SYNCZ)
        await eventually(s.proxy.admin_port, "istioctl_proxy_calls_total", 1.0, type_url="other",
                         outcome="UNAUTHENTICATED")
