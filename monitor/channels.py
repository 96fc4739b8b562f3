"""Alert channels: webhook, Slack, DingTalk (signed), email. Each `send` raises on failure.

Channel settings (`alerts.channels[]` in monitor.yml), besides `type` and `min_severity`:
  every type:  timeout (s, 5), retries (3), rate_per_minute (30)
  webhook:     url, headers (mapping)
  slack:       url (an incoming-webhook URL)
  dingtalk:    access_token, secret, url (default: DingTalk's robot endpoint)
  email:       host, port (587), tls (starttls | ssl | none), user, password, from, to (list)
A secret can also be given as `<name>_file` (read at start) or `<name>_env` (an environment
variable): url, access_token, secret, password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import smtplib
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

from monitor import units
from monitor.errors import ConfigError
from monitor.redact import label, redact, redact_url, short

DINGTALK_URL = "https://oapi.dingtalk.com/robot/send"
SECRETS = ("url", "access_token", "secret", "password")
_SECRET_SOURCES = {f"{secret}_{how}" for secret in SECRETS for how in ("file", "env")}
_COMMON = {"type", "min_severity", "timeout", "retries", "rate_per_minute"}
_KEYS = {
    "webhook": {"url", "headers"},
    "slack": {"url"},
    "dingtalk": {"access_token", "secret", "url"},
    "email": {"host", "port", "tls", "ca_file", "user", "password", "from", "to"},
}
_REQUIRED = {
    "webhook": ("url",),
    "slack": ("url",),
    "dingtalk": ("access_token", "secret"),
    "email": ("host", "from", "to"),
}


class AlertLike(Protocol):
    @property
    def severity(self) -> str: ...

    @property
    def summary(self) -> str: ...

    def document(self) -> dict[str, Any]: ...


@dataclass
class Channel:
    name: str
    min_severity: str = "warning"
    timeout_s: float = 5.0
    retries: int = 3
    rate_per_minute: float = 30.0
    options: dict[str, Any] = field(default_factory=dict)

    def wants(self, severity: str) -> bool:
        return self.min_severity == "warning" or severity == "critical"

    def send(self, alert: AlertLike) -> None:
        raise NotImplementedError


class Webhook(Channel):
    """POST one JSON document per alert (README "Alerts" gives its schema)."""

    def send(self, alert: AlertLike) -> None:
        headers = {"Content-Type": "application/json", **self.options.get("headers", {})}
        _post(self.options["url"], alert.document(), headers, self.timeout_s)


class Slack(Channel):
    def send(self, alert: AlertLike) -> None:
        icon = ":rotating_light:" if alert.severity == "critical" else ":warning:"
        _post(self.options["url"], {"text": f"{icon} {alert.summary}"}, {}, self.timeout_s)


class DingTalk(Channel):
    def send(self, alert: AlertLike) -> None:
        timestamp = str(units.to_ms(time.time()))
        query = urllib.parse.urlencode(
            {
                "access_token": self.options["access_token"],
                "timestamp": timestamp,
                "sign": dingtalk_sign(self.options["secret"], timestamp),
            }
        )
        url = f"{self.options.get('url', DINGTALK_URL)}?{query}"
        body = {"msgtype": "text", "text": {"content": f"[gpulock-monitor] {alert.summary}"}}
        reply = _post(url, body, {}, self.timeout_s)
        # DingTalk answers 200 with {"errcode": ...} when it refuses (bad signature, rate limit).
        try:
            errcode = json.loads(reply or b"{}").get("errcode", 0)
        except ValueError:
            errcode = 0
        if errcode:
            raise OSError(f"dingtalk refused the message: {redact(short(reply, 200))}")


class Email(Channel):
    def send(self, alert: AlertLike) -> None:
        o = self.options
        message = EmailMessage()
        message["Subject"] = f"[gpulock-monitor] {alert.severity.upper()}: {alert.summary}"[:250]
        message["From"] = o["from"]
        message["To"] = ", ".join(o["to"])
        message.set_content(_email_body(alert))
        tls = o.get("tls", "starttls")
        port = int(o.get("port", 465 if tls == "ssl" else 587))
        # The server's certificate is always verified: against the system's CAs, or a private CA's.
        context = ssl.create_default_context(cafile=o.get("ca_file"))
        smtp: smtplib.SMTP
        if tls == "ssl":
            smtp = smtplib.SMTP_SSL(o["host"], port, timeout=self.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(o["host"], port, timeout=self.timeout_s)
        with smtp:
            if tls == "starttls":
                smtp.starttls(context=context)
            if o.get("user"):
                smtp.login(o["user"], o.get("password", ""))
            smtp.send_message(message)


def dingtalk_sign(secret: str, timestamp: str) -> str:
    """The robot signature: base64(HMAC-SHA256(secret, "timestamp\\nsecret")), URL-encoded by the caller."""
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


_TYPES: dict[str, type[Channel]] = {"webhook": Webhook, "slack": Slack, "dingtalk": DingTalk, "email": Email}


def validate(raw: Mapping[str, Any], path: str) -> None:
    """Check one channel's keys and values (secrets are not read here)."""
    kind = raw["type"]
    allowed = _COMMON | _KEYS[kind] | {f"{s}_{how}" for s in SECRETS if s in _KEYS[kind] for how in ("file", "env")}
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"{path}.{label(key)}: unknown key for a {kind} channel (expected one of: {', '.join(sorted(allowed))})"
            )
    for key in _REQUIRED[kind]:
        if not any(name in raw for name in (key, f"{key}_file", f"{key}_env")):
            raise ConfigError(f"{path}: a {kind} channel needs {key}")
    for key, low in (("timeout", 0.0), ("rate_per_minute", 0.0)):
        value = raw.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
            raise ConfigError(f"{path}.{key}: expected a positive number, got {short(value)}")
    retries = raw.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{path}.retries: expected an integer >= 0, got {short(retries)}")
    if kind == "email":
        if raw.get("tls", "starttls") not in ("starttls", "ssl", "none"):
            raise ConfigError(f"{path}.tls: expected one of starttls|ssl|none, got {short(raw.get('tls'))}")
        ca_file = raw.get("ca_file")
        if ca_file is not None and not (isinstance(ca_file, str) and Path(ca_file).is_file()):
            raise ConfigError(f"{path}.ca_file: not a readable file: {label(ca_file, 200)}")
        to = raw.get("to")
        if not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
            raise ConfigError(f"{path}.to: expected a list of addresses, got {short(to)}")
    if kind == "webhook" and not isinstance(raw.get("headers", {}), Mapping):
        raise ConfigError(f"{path}.headers: expected a mapping")


def build(raw_channels: tuple[Mapping[str, Any], ...], env: Mapping[str, str]) -> list[Channel]:
    """Channels ready to send, secrets resolved from files and the environment."""
    channels = []
    for i, raw in enumerate(raw_channels):
        path = f"alerts.channels[{i}]"
        kind = raw["type"]
        options = {k: v for k, v in raw.items() if k not in _COMMON and k not in _SECRET_SOURCES}
        for secret in SECRETS:
            if f"{secret}_file" in raw:
                name = raw[f"{secret}_file"]
                try:
                    options[secret] = Path(name).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"{path}.{secret}_file: cannot read {label(name, 200)}: {exc.__class__.__name__}"
                    ) from None
            if f"{secret}_env" in raw:
                var = raw[f"{secret}_env"]
                if not env.get(var):
                    raise ConfigError(f"{path}.{secret}_env: environment variable {label(var)} is not set")
                options[secret] = env[var]
        channels.append(
            _TYPES[kind](
                name=f"{kind}[{i}]",
                min_severity=raw.get("min_severity", "warning"),
                timeout_s=float(raw.get("timeout", 5)),
                retries=int(raw.get("retries", 3)),
                rate_per_minute=float(raw.get("rate_per_minute", 30)),
                options=options,
            )
        )
    return channels


def _post(url: str, body: dict[str, Any], headers: Mapping[str, str], timeout_s: float) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise OSError(f"not an http(s) URL: {redact_url(url, path=True)!r}")
    data = json.dumps(body, ensure_ascii=False).encode()
    # S310: the scheme was checked just above; file: and custom schemes never get here.
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        return bytes(response.read(65536))


def _email_body(alert: AlertLike) -> str:
    doc = alert.document()
    lines = [alert.summary, ""]
    for key in ("severity", "event", "lock_key", "holder", "held_s", "heartbeat", "host", "ts"):
        if doc.get(key) is not None:
            lines.append(f"{key}: {doc[key]}")
    if doc.get("decision"):
        lines.append(f"decision: {json.dumps(doc['decision'])}")
    return "\n".join(lines) + "\n"
