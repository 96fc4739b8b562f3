"""The optional `apprise` alert channel, against a real HTTP server on loopback (Apprise's `json://`
service): delivery, failure, redaction of the tokens its URLs carry, and a clear line without the package."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from monitor import channels
from monitor.alerts import Alerts, alert_for, channel_secrets
from monitor.config import Settings
from monitor.errors import ConfigError
from monitor.events import Event
from monitor.redact import redact

pytest.importorskip("apprise")

from test_alerts import RELEASED  # the same released lock as the other channels are tested with

WARNING = {"lock_key": "gpu_lock:1", "holder": "locked_by_asr", "held_s": 301.0, "tier": "warning", "holding": 3}


class Service:
    """What Apprise's json:// service posts to: every request recorded, answered `code`."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.code = 200
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                service.posts.append({"path": self.path, "auth": self.headers.get("Authorization"), **json.loads(body)})
                self.send_response(service.code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


def settings_with(*chans: dict[str, Any]) -> Settings:
    return Settings.from_mapping({"alerts": {"channels": list(chans)}}, env={})


def manager(settings: Settings, env: dict[str, str] | None = None) -> Alerts:
    built = channels.build(settings.alert_channels, env or {})
    return Alerts(settings, built, host="gpu-node-7", sleep=lambda _s: None).start()


def test_each_alert_reaches_every_url_with_its_severity(service):
    urls = [f"json://127.0.0.1:{service.port}/first", f"json://127.0.0.1:{service.port}/second"]
    alerts = manager(settings_with({"type": "apprise", "urls": urls}))
    alerts.on_event(Event.LOCK_RELEASED, RELEASED)
    alerts.on_event(Event.LOCK_WARNING, WARNING)
    assert alerts.wait_idle(10)
    assert alerts.stats()["apprise[0]"].sent == 2
    assert sorted(p["path"] for p in service.posts) == ["/first", "/first", "/second", "/second"]
    critical = [p for p in service.posts if p["type"] == "failure"]
    warning = [p for p in service.posts if p["type"] == "warning"]
    assert len(critical) == len(warning) == 2
    assert critical[0]["title"] == "[gpulock-monitor] CRITICAL"
    assert "gpu_lock:0 held by locked_by_tts" in critical[0]["message"]
    assert "lock_key: gpu_lock:0" in critical[0]["message"]
    assert warning[0]["title"] == "[gpulock-monitor] WARNING"


def test_min_severity_critical_keeps_warnings_away(service):
    alerts = manager(
        settings_with({"type": "apprise", "urls": [f"json://127.0.0.1:{service.port}/"], "min_severity": "critical"})
    )
    alerts.on_event(Event.LOCK_WARNING, WARNING)
    alerts.on_event(Event.LOCK_RELEASED, RELEASED)
    assert alerts.wait_idle(10)
    assert [p["type"] for p in service.posts] == ["failure"]


def test_a_refused_send_fails_the_channel_and_its_log_line_shows_no_token(service, capsys, caplog):
    service.code = 500
    url = f"json://alerts:hunter2-PASSWORD@127.0.0.1:{service.port}/hook-TOKEN-4f9a2c"
    settings = settings_with({"type": "apprise", "urls": [url], "retries": 1})
    (channel,) = channels.build(settings.alert_channels, {})
    alerts = Alerts(settings, [channel], host="h", sleep=lambda _s: None).start()
    alerts.on_event(Event.LOCK_RELEASED, RELEASED)
    assert alerts.wait_idle(10)
    assert alerts.stats()["apprise[0]"].failed == 1
    assert len(service.posts) == 2  # the first try and one retry
    assert service.posts[0]["auth"]  # the password did go to the service
    with pytest.raises(OSError, match=r"apprise: 1 of 1 failed \(json://\*\*\*\)") as failed:
        channel.send(alert_of(RELEASED))
    shown = redact(str(failed.value), secrets=channel_secrets(channel))
    logged = capsys.readouterr().out + caplog.text
    assert "alert_send_failed" in logged
    for secret in ("hunter2-PASSWORD", "hook-TOKEN-4f9a2c"):
        assert secret not in shown
        assert secret not in logged


def alert_of(fields: dict[str, Any]) -> Any:
    alert = alert_for(Event.LOCK_RELEASED, fields, host="h", now=0.0)
    assert alert is not None
    return alert


def test_config_show_and_errors_show_only_the_scheme_of_an_apprise_url():
    token = "123456789:AAEhBOweik6ad9r_QXMENQjcrGbqCr4K-bs"  # a made-up Telegram bot token
    settings = settings_with({"type": "apprise", "urls": [f"tgram://{token}/-100123456", "ntfy://ntfy.sh/gpus"]})
    shown = settings.redacted()["alerts"]["channels"][0]
    assert shown == {"type": "apprise", "urls": ["tgram://***", "ntfy://***"]}
    assert token not in yaml.safe_dump(settings.redacted())
    with pytest.raises(ConfigError) as bad:
        settings_with({"type": "apprise", "urls": ["ntfy://ntfy.sh/gpus", f"nosuchservice://{token}/x"]})
    assert str(bad.value) == ("alerts.channels[0].urls[1]: not a URL of a service apprise knows: nosuchservice://***")
    assert token not in str(bad.value)


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ({"type": "apprise"}, "alerts.channels[0]: an apprise channel needs urls"),
        ({"type": "apprise", "urls": []}, "alerts.channels[0].urls: expected a list of apprise URLs"),
        ({"type": "apprise", "urls": "json://h/"}, "alerts.channels[0].urls: expected a list of apprise URLs"),
        ({"type": "apprise", "urls": [7]}, "alerts.channels[0].urls[0]: expected an apprise URL"),
        ({"type": "apprise", "urls": ["json://h/"], "url": "x"}, "alerts.channels[0].url: unknown key"),
    ],
)
def test_bad_apprise_options_are_one_line_naming_the_key(channel, message):
    with pytest.raises(ConfigError) as bad:
        settings_with(channel)
    assert str(bad.value).startswith(message)
    assert "\n" not in str(bad.value)


def test_urls_from_a_file_or_the_environment_are_checked_when_read(service, tmp_path):
    good = f"json://127.0.0.1:{service.port}/from-file"
    (tmp_path / "urls").write_text(f"# one a line, or several split by spaces or commas\n{good}\n\n")
    settings = settings_with({"type": "apprise", "urls_file": str(tmp_path / "urls")})
    assert settings.redacted()["alerts"]["channels"][0] == {"type": "apprise", "urls_file": str(tmp_path / "urls")}
    (channel,) = channels.build(settings.alert_channels, {})
    assert channel.options["urls"] == [good]
    channel.send(alert_of(RELEASED))
    assert [p["path"] for p in service.posts] == ["/from-file"]
    from_env = settings_with({"type": "apprise", "urls_env": "ALERT_URLS"})
    (channel,) = channels.build(from_env.alert_channels, {"ALERT_URLS": f"{good}, ntfy://ntfy.sh/gpus"})
    assert channel.options["urls"] == [good, "ntfy://ntfy.sh/gpus"]
    with pytest.raises(ConfigError, match=r"alerts\.channels\[0\]\.urls\[1\]: not a URL of a service apprise knows"):
        channels.build(from_env.alert_channels, {"ALERT_URLS": f"{good} nosuch://secret-thing"})
    (tmp_path / "urls").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"alerts\.channels\[0\]\.urls: no apprise URL in it"):
        channels.build(settings.alert_channels, {})


def test_without_the_package_the_channel_is_one_line_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "apprise", None)  # `import apprise` now raises ImportError
    with pytest.raises(ConfigError) as missing:
        settings_with({"type": "apprise", "urls": ["ntfy://ntfy.sh/gpus"]})
    assert str(missing.value) == (
        "alerts.channels[0].type: the apprise channel needs the apprise package: pip install 'gpulock-monitor[apprise]'"
    )
