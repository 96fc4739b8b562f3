"""Alert channels: webhook, Slack, DingTalk (signed), email, Apprise. Each `send` raises on failure.

Channel settings (`alerts.channels[]` in monitor.yml), besides `type` and `min_severity`:
  every type:  timeout (s, 5), retries (3), rate_per_minute (30)
  webhook:     url, headers (mapping)
  slack:       url (an incoming-webhook URL)
  dingtalk:    access_token, secret, url (default: DingTalk's robot endpoint)
  email:       host, port (587), tls (starttls | ssl | none), user, password, from, to (list)
  apprise:     urls (list): any service Apprise knows (the optional extra `[apprise]`)
A secret can also be given as `<name>_file` (read at start) or `<name>_env` (an environment
variable): url, access_token, secret, password, urls (one or more, by line, space or comma).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import logging
import re
import smtplib
import ssl
import threading
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
from monitor.redact import label, redact, redact_service_url, redact_url, short

DINGTALK_URL = "https://oapi.dingtalk.com/robot/send"
SECRETS = ("url", "access_token", "secret", "password", "urls")
APPRISE_MISSING = "the apprise channel needs the apprise package: pip install 'gpulock-monitor[apprise]'"
_SECRET_SOURCES = {f"{secret}_{how}" for secret in SECRETS for how in ("file", "env")}
_COMMON = {"type", "min_severity", "timeout", "retries", "rate_per_minute"}
_KEYS = {
    "webhook": {"url", "headers"},
    "slack": {"url"},
    "dingtalk": {"access_token", "secret", "url"},
    "email": {"host", "port", "tls", "ca_file", "user", "password", "from", "to"},
    "apprise": {"urls"},
}
_REQUIRED = {
    "webhook": ("url",),
    "slack": ("url",),
    "dingtalk": ("access_token", "secret"),
    "email": ("host", "from", "to"),
    "apprise": ("urls",),
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

    def __post_init__(self) -> None:
        """Where a channel type checks and prepares its options (at start: a bad one is a ConfigError)."""

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


class Apprise(Channel):
    """Every service Apprise knows (Telegram, Discord, Teams, ntfy, Pushover, ...), one URL each.

    All of the channel's services get every alert; one that fails makes the send fail, and a retry
    sends to all of them again. What Apprise logs about a send ends up in this channel's own failure
    line, through the channel's redaction (its own logger is kept quiet)."""

    def __post_init__(self) -> None:
        # Named as in monitor.yml: `build` names channel i of alerts.channels `apprise[i]`.
        where = "alerts.channels" + self.name[self.name.find("[") :] if "[" in self.name else self.name
        self.options["urls"] = apprise_urls(self.options["urls"])
        if not self.options["urls"]:
            raise ConfigError(f"{where}.urls: no apprise URL in it")
        self._services = [
            _apprise_service(url, f"{where}.urls[{i}]", self.timeout_s) for i, url in enumerate(self.options["urls"])
        ]

    def send(self, alert: AlertLike) -> None:
        nv = _apprise_module(self.name)
        kind = nv.NotifyType.FAILURE if alert.severity == "critical" else nv.NotifyType.WARNING
        failed = []
        # One capture at a time: Apprise logs through one logger, and a channel's failure line
        # must hold only what its own services said (redacted with its own secrets).
        with _APPRISE_SENDING, nv.LogCapture(level=logging.WARNING, fmt="%(message)s") as said:
            for url, service in zip(self.options["urls"], self._services, strict=True):
                box = nv.Apprise()
                box.add(service)
                title = f"[gpulock-monitor] {alert.severity.upper()}"
                if not box.notify(body=_email_body(alert), title=title, notify_type=kind, body_format="text"):
                    failed.append(redact_service_url(url))
            told = said.getvalue()
        if failed:
            why = "; ".join(line.strip() for line in told.splitlines()[-3:] if line.strip())
            raise OSError(f"apprise: {len(failed)} of {len(self._services)} failed ({', '.join(failed)}): {why}")


_APPRISE_SENDING = threading.Lock()


def _apprise_module(where: str) -> Any:
    """The apprise package, its logger kept to itself, or a ConfigError saying how to install it."""
    try:
        nv = importlib.import_module("apprise")
    except ImportError:
        raise ConfigError(f"{where}: {APPRISE_MISSING}") from None
    quiet = logging.getLogger("apprise")
    if quiet.propagate:  # once: never to the root logger (its lines may quote a URL); LogCapture reads it
        quiet.propagate = False
        quiet.addHandler(logging.NullHandler())
    return nv


def apprise_urls(value: Any) -> list[str]:
    """A channel's `urls`: a list as written in monitor.yml, or text from `urls_file`/`urls_env`
    (one or more a line, split at spaces and commas; `#` starts a comment line)."""
    if isinstance(value, str):
        lines = [line.strip() for line in value.splitlines()]
        return [url for line in lines if line and not line.startswith("#") for url in re.split(r"[\s,]+", line) if url]
    return [str(url) for url in value]


def _apprise_service(url: str, where: str, timeout_s: float) -> Any:
    """One of Apprise's services for `url`, with the channel's timeout unless the URL sets its own."""
    nv = _apprise_module(where)
    service = nv.Apprise.instantiate(url, suppress_exceptions=True)
    if service is None:
        raise ConfigError(f"{where}: not a URL of a service apprise knows: {redact_service_url(url)}")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    if "cto" not in query:
        service.socket_connect_timeout = timeout_s
    if "rto" not in query:
        service.socket_read_timeout = timeout_s
    return service


def dingtalk_sign(secret: str, timestamp: str) -> str:
    """The robot signature: base64(HMAC-SHA256(secret, "timestamp\\nsecret")), URL-encoded by the caller."""
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


_TYPES: dict[str, type[Channel]] = {
    "webhook": Webhook,
    "slack": Slack,
    "dingtalk": DingTalk,
    "email": Email,
    "apprise": Apprise,
}


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
            raise ConfigError(f"{path}: {'an' if kind[0] in 'aeiou' else 'a'} {kind} channel needs {key}")
    for key, low in (("timeout", 0.0), ("rate_per_minute", 0.0)):
        value = raw.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
            raise ConfigError(f"{path}.{key}: expected a positive number, got {short(value)}")
    retries = raw.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{path}.retries: expected an integer >= 0, got {short(retries)}")
    if kind == "email":
        _validate_email(raw, path)
    if kind == "webhook" and not isinstance(raw.get("headers", {}), Mapping):
        raise ConfigError(f"{path}.headers: expected a mapping")
    if kind == "apprise":
        _validate_apprise(raw, path)


def _validate_email(raw: Mapping[str, Any], path: str) -> None:
    if raw.get("tls", "starttls") not in ("starttls", "ssl", "none"):
        raise ConfigError(f"{path}.tls: expected one of starttls|ssl|none, got {short(raw.get('tls'))}")
    ca_file = raw.get("ca_file")
    if ca_file is not None and not (isinstance(ca_file, str) and Path(ca_file).is_file()):
        raise ConfigError(f"{path}.ca_file: not a readable file: {label(ca_file, 200)}")
    to = raw.get("to")
    if not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
        raise ConfigError(f"{path}.to: expected a list of addresses, got {short(to)}")


def _validate_apprise(raw: Mapping[str, Any], path: str) -> None:
    """The package is there, and each URL written in the file is one of its services (those of
    `urls_file` and `urls_env` are checked when they are read, at start)."""
    _apprise_module(f"{path}.type")
    if "urls" not in raw:
        return
    urls = raw["urls"]
    if not isinstance(urls, list) or not urls:
        raise ConfigError(f"{path}.urls: expected a list of apprise URLs, got {short(urls, 20)}")
    for i, url in enumerate(urls):
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{path}.urls[{i}]: expected an apprise URL, got {short(url, 20)}")
        _apprise_service(url, f"{path}.urls[{i}]", 5.0)


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
