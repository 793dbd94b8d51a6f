"""Logging setup: text or JSON lines. Secrets never reach here: callers are logged by principal only."""

from __future__ import annotations

import json
import logging
import re
import sys

# Belt and braces: whatever slips into a message, a bearer token or a PEM key is masked.
_SECRET = re.compile(
    r"(Bearer\s+)[A-Za-z0-9._~+/=-]+|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
)


def redact(text: str) -> str:
    """`text` with bearer tokens and PEM keys replaced by [REDACTED]."""
    return _SECRET.sub(lambda m: (m.group(1) or "") + "[REDACTED]", text)


# Line breaks and other control characters, including Unicode's own line separators: escaped, so that one
# record is one line whatever a caller or a replica put in it (upstream error texts reach log messages),
# and nobody can forge a log line. Tracebacks become one line too (read them with `sed 's/\\n/\n/g'`).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with control characters escaped, so one record stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return one_line(redact(super().format(record)))


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            # Structured members for log pipelines; strings are redacted like the message.
            out.update({k: redact(v) if isinstance(v, str) else v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send every log record to stderr, as text or JSON lines, redacted, at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is chatty at debug level and may echo metadata.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    # The Kubernetes client's HTTP layer logs every request at INFO.
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)


__all__ = ["one_line", "redact", "setup"]
