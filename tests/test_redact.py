"""One redaction function for every surface that can show a secret: config show, config errors,
alert channels' failure logs. No Redis needed."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from click.testing import CliRunner

from monitor import channels, logs
from monitor.alerts import Alert, Alerts, channel_secrets
from monitor.cli import main
from monitor.config import Settings, load_settings
from monitor.errors import ConfigError
from monitor.redact import is_secret_name, label, redact, redact_url, secret_fragments, short

SECRET = "S3cr3tValue"  # what no surface may show


# --- redact_url: one URL, any form ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:6380/2", "redis://user:***@host:6380/2"),
        ("redis://:pw@host/0", "redis://:***@host/0"),
        ("redis://host/0", "redis://host/0"),
        ("redis://host:6379", "redis://host:6379"),
        (
            "rediss://default:pw@10.0.0.1:6380/2?ssl_cert_reqs=required",
            "rediss://default:***@10.0.0.1:6380/2?ssl_cert_reqs=required",
        ),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("unix://:pw@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("unix:///run/redis.sock?db=2&password=pw", "unix:///run/redis.sock?db=2&password=***"),
        # A password where the user name goes (no colon): the whole user part is masked.
        ("redis://pw@host/0", "redis://***@host/0"),
        # Passwords holding URL delimiters: everything up to the last @ before the query.
        ("redis://:p/w@rd@host/0", "redis://:***@host/0"),
        ("redis://u:p:w@host/0", "redis://u:***@host/0"),
        # Query-string secrets, by name.
        ("redis://host/0?password=pw", "redis://host/0?password=***"),
        ("redis://host/0?db=2&password=pw&client_name=m", "redis://host/0?db=2&password=***&client_name=m"),
        ("rediss://host/0?ssl_password=pw&ssl_keyfile=/k.pem", "rediss://host/0?ssl_password=***&ssl_keyfile=/k.pem"),
        ("https://h/x?token=t&access_token=a&secret=s", "https://h/x?token=***&access_token=***&secret=***"),
        ("https://h/x?api_key=k&X-Api-Key=k&sign=s&sig=s", "https://h/x?api_key=***&X-Api-Key=***&sign=***&sig=***"),
        ("https://h/x?passwd=p&pwd=p&auth=a&credentials=c", "https://h/x?passwd=***&pwd=***&auth=***&credentials=***"),
        ("https://h/x?Password=p", "https://h/x?Password=***"),
        ("https://h/x?pass%77ord=p", "https://h/x?pass%77ord=***"),  # percent-encoded name
        ("https://h/x?key_pattern=gpu&db=2", "https://h/x?key_pattern=gpu&db=2"),  # not secret names
        ("https://h/x?token=", "https://h/x?token="),  # nothing to hide
        ("https://h/cb#access_token=a&state=1", "https://h/cb#access_token=***&state=1"),
        # Mistyped and unparseable: still masked, never an exception.
        ("redis//:pw@host/0", "redis//:***@host/0"),
        ("redis:/:pw@host/0", "redis:/:***@host/0"),
        ("redis:pw@host", "redis:***@host"),
        ("//:pw@host/0", "//:***@host/0"),
        ("http://:pw@h:abc/0", "http://:***@h:abc/0"),
        ("redis://u:pw@[::1/0", "redis://u:***@[::1/0"),
        ("redis://:pw@host:99999/0", "redis://:***@host:99999/0"),
        ("user:pw@host", "user:***@host"),
        ("", ""),
        ("no url at all", "no url at all"),
    ],
)
def test_redact_url_masks_password_and_secret_query_values_in_any_url_form(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/XXXXXXXX", "https://hooks.slack.com/***"),
        ("https://oapi.dingtalk.com/robot/send?access_token=abc", "https://oapi.dingtalk.com/***"),
        ("https://alerts.example.com:8443/hook/abc?x=1#y", "https://alerts.example.com:8443/***"),
        ("https://user:pw@alerts.example.com/hook", "https://user:***@alerts.example.com/***"),
        ("https://tok@alerts.example.com/hook", "https://***@alerts.example.com/***"),
        ("https://alerts.example.com", "https://alerts.example.com"),
        ("https://alerts.example.com?token=t", "https://alerts.example.com/***"),
        # Mistyped schemes: the secret path never shows.
        ("htps://hooks.slack.com/services/T000/B000/XXXXXXXX", "htps://hooks.slack.com/***"),
        ("https//hooks.slack.com/services/T000/B000/XXXXXXXX", "https//hooks.slack.com/***"),
        ("https:/hooks.slack.com/services/T000/B000/XXXXXXXX", "https:/***"),
        ("hooks.slack.com/services/T000/B000/XXXXXXXX", "hooks.slack.com/***"),
        ("file:///etc/passwd", "file:///***"),
    ],
)
def test_redact_alert_url_masks_path_and_query(url, shown):
    assert redact_url(url, path=True) == shown


# --- redact: free text (errors, log values) -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secrets", "shown"),
    [
        ("Error connecting to redis://:pw@h:6379/0.", (), "Error connecting to redis://:***@h:6379/0."),
        ("url 'redis://u:pw@h/0?password=p' refused", (), "url 'redis://u:***@h/0?password=***' refused"),
        (
            "not an http(s) URL: 'htps://hooks.slack.com/services/T0/B0/XYZ'",
            (),
            "not an http(s) URL: 'htps://hooks.slack.com/***'",
        ),
        (
            "posting to https://hooks.slack.com/services/T0/B0/XYZ failed",
            (),
            "posting to https://hooks.slack.com/*** failed",
        ),
        ("posting to https://open.feishu.cn/open-apis/bot/v2/hook/abc", (), "posting to https://open.feishu.cn/***"),
        ("posting to https://example.com/hook/abc failed", (), "posting to https://example.com/hook/abc failed"),
        ("GET /robot/send?access_token=abc&timestamp=1", (), "GET /robot/send?access_token=***&timestamp=1"),
        ("token=abc secret = xyz key =k password='a b'", (), "token=*** secret = *** key =*** password='*** ***'"),
        ("Authorization: Bearer abcdef123456", (), "Authorization: Bearer ***"),
        ("redis//:pw@host/0 and redis:pw@host", (), "redis//:***@host/0 and redis:***@host"),
        ("the key is hunter2", ("hunter2",), "the key is ***"),
        ("the path /services/T0/B0/XYZ was refused", ("https://hooks.example/services/T0/B0/XYZ",), None),
        ("a\\nb", ("ab",), "a\\nb"),  # a secret shorter than 3 characters is not replaced everywhere
        ("ops@example.com is paged", (), "ops@example.com is paged"),
        ("gpu_lock.key_pattern: must end with '*'", (), "gpu_lock.key_pattern: must end with '*'"),
        ("", (), ""),
    ],
)
def test_redact_masks_urls_secret_assignments_and_known_secrets_in_text(text, secrets, shown):
    pieces = [p for s in secrets for p in secret_fragments(s)]
    out = redact(text, secrets=pieces)
    if shown is not None:
        assert out == shown
    for secret in secrets:
        assert secret not in out
    assert "XYZ" not in out


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("ssl_password", True),
        ("access_token", True),
        ("accessToken", True),
        ("client_secret", True),
        ("api_key", True),
        ("X-Api-Key", True),
        ("apikey", True),
        ("sign", True),
        ("Authorization", True),
        ("session", True),
        ("key", True),
        ("key_pattern", False),
        ("ssl_keyfile", False),
        ("ssl_certfile", False),
        ("ssl_ca_certs", False),
        ("db", False),
        ("timestamp", False),
        ("client_name", False),
        ("", False),
    ],
)
def test_secret_names_are_recognised_and_lookalikes_are_not(name, secret):
    assert is_secret_name(name) is secret


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "make",
    [
        lambda: "x" * 1_000_000,
        lambda: "redis://:" + SECRET + "@h/0" + "x" * 10_000,
        lambda: "x" * 10_000 + " password=" + SECRET,
        lambda: ["a" * 100_000] * 10_000,
        lambda: {f"k{i}": "v" * 1000 for i in range(10_000)},
        lambda: _nested(5000),
        lambda: 10**5000,
        lambda: -(10**5000),
        lambda: b"\x00" * 100_000,
        lambda: 1e308,
        lambda: float("nan"),
        Unprintable,
        lambda: "line\nbreak\rand\x1b[31mescape",
    ],
    ids=["long", "url", "param", "list", "dict", "deep", "int", "-int", "bytes", "float", "nan", "repr", "ctrl"],
)
def test_short_is_bounded_one_line_and_redacted(make):
    shown = short(make())
    assert len(shown) <= 100
    assert "\n" not in shown
    assert "\r" not in shown
    assert "\x1b" not in shown
    assert SECRET not in shown


def test_short_never_cuts_a_password_in_half():
    # The cut comes after the mask: not even the password's first letters show.
    shown = short("redis://user:" + SECRET * 20 + "@host/0", 30)
    assert "S3c" not in shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("DING_TOKEN", "DING_TOKEN"),
        ("/run/credentials/gpulock-monitor/ca.pem", "/run/credentials/gpulock-monitor/ca.pem"),
        ("a\nb", "'a\\nb'"),
        (7, "7"),
        ("x" * 500, None),
    ],
)
def test_label_shows_a_value_as_it_is_or_escaped_and_bounded(value, shown):
    out = label(value)
    if shown is not None:
        assert out == shown
    assert len(out) <= 100


# --- config show ----------------------------------------------------------------------------------

ALERTS = {
    "channels": [
        {"type": "slack", "url": "https://hooks.slack.com/services/T0/B0/" + SECRET},
        {"type": "webhook", "url": "https://alerts.example.com/hook?token=" + SECRET, "headers": {"X-Auth": SECRET}},
        {"type": "dingtalk", "access_token": SECRET, "secret": SECRET + "2"},
        {"type": "email", "host": "smtp", "from": "a@b", "to": ["c@d"], "user": "u", "password": SECRET},
    ]
}


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@h:6379/2",
        f"redis://monitor:{SECRET}@h:6379/2",
        f"redis://h:6379/2?password={SECRET}",
        f"rediss://h:6380/2?ssl_password={SECRET}",
        f"redis://{SECRET}@h:6379/2",
        f"unix://:{SECRET}@/run/redis.sock?db=2",
    ],
)
def test_config_show_masks_every_secret(tmp_path, url):
    config = tmp_path / "monitor.yml"
    config.write_text(yaml.safe_dump({"redis": {"url": url}, "alerts": ALERTS}))
    result = CliRunner().invoke(main, ["config", "show", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    shown = yaml.safe_load(result.output)
    assert shown["redis"]["url"].count("***") == 1
    slack, webhook, dingtalk, email = shown["alerts"]["channels"]
    assert slack["url"] == "https://hooks.slack.com/***"
    assert webhook["url"] == "https://alerts.example.com/***"
    assert webhook["headers"] == {"X-Auth": "***"}
    assert (dingtalk["access_token"], dingtalk["secret"], email["password"]) == ("***", "***", "***")
    # What `show` prints is still a valid config.
    again = tmp_path / "again.yml"
    again.write_text(result.output)
    assert load_settings(str(again), env={}).alert_channels


# --- config errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"redis//:{SECRET}@h/0",  # a missing colon: no scheme at all
        f"redis:/:{SECRET}@h/0",
        f"http://:{SECRET}@h/0",
        f"reddis://u:{SECRET}@h/0",
        f"redis:{SECRET}@h",
        f"redis://:{SECRET}@h:abc/0",
        f"redis://:{SECRET}@h:99999/0",
        f"redis://:{SECRET}@[::1/0",
        f"redis://:{SECRET}@h/zero",
        f"redis://h/0?password={SECRET}&bogus=1",
        f"redis://h/0?password={SECRET}&db=x",
        f"rediss://u:{SECRET}@h/0?ssl_cert_reqs=required&typo=1",
        f"redis://u:{SECRET}@h/0 trailing",
    ],
)
def test_a_bad_redis_url_is_one_line_without_its_password(url):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"redis": {"url": url}}, env={})
    message = str(info.value)
    assert message.startswith("redis.url: ")
    assert SECRET not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        f"htps://hooks.slack.com/services/T0/B0/{SECRET}",
        f"https//hooks.slack.com/services/T0/B0/{SECRET}",
        f"hooks.slack.com/services/T0/B0/{SECRET}",
        f"ftp://alerts.example.com/hook?token={SECRET}",
        f"https://hooks.slack.com:abc/services/T0/B0/{SECRET}",
        f"https://[::1/services/{SECRET}",
        f"https:///services/{SECRET}",
        f"https://hooks.slack.com/services/T0/B0/{SECRET} ",
    ],
)
def test_a_bad_alert_url_is_refused_at_config_check_without_its_path(url):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"alerts": {"channels": [{"type": "slack", "url": url}]}}, env={})
    message = str(info.value)
    assert message.startswith("alerts.channels[0].url: ")
    assert SECRET not in message
    assert "services" not in message


def test_config_errors_never_show_a_password_from_the_environment(tmp_path):
    config = tmp_path / "m.yml"
    config.write_text("redis:\n  url: ${URL}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(config), env={"URL": f"redis//:{SECRET}@h/0"})
    assert SECRET not in str(info.value)


# --- alert channels' failure logs ---------------------------------------------------------------


def _delivered_logs(capsys, channel: dict, env: dict[str, str]) -> str:
    settings = Settings.from_mapping({"alerts": {"channels": [{**channel, "retries": 1, "timeout": 2}]}}, env={})
    logs.configure("info", "json", stream=sys.stdout)  # sys.stdout is capsys's now
    built = channels.build(settings.alert_channels, env)
    alerts = Alerts(settings, built, host="n1", sleep=lambda _s: None).start()
    try:
        alerts.submit(Alert("critical", "lock_released", "n1: released gpu_lock:0", "n1", 0.0, lock_key="gpu_lock:0"))
        assert alerts.wait_idle(20)
    finally:
        alerts.stop(1)
    out = capsys.readouterr().out
    assert [json.loads(line)["event"] for line in out.splitlines()] == [
        "alert_send_failed",
        "alert_send_failed",
        "alert_undelivered",
    ]
    return out


@pytest.mark.parametrize(
    ("channel", "env"),
    [
        # The case: a Slack URL with a mistyped scheme, from the environment.
        ({"type": "slack", "url_env": "HOOK"}, {"HOOK": f"htps://hooks.slack.com/services/T0/B0/{SECRET}"}),
        ({"type": "slack", "url_env": "HOOK"}, {"HOOK": f"hooks.slack.com/services/T0/B0/{SECRET}"}),
        ({"type": "webhook", "url_env": "HOOK"}, {"HOOK": f"file:///hooks/{SECRET}?token={SECRET}"}),
        # A port that is not a number: urllib quotes the netloc.
        ({"type": "webhook", "url_env": "HOOK"}, {"HOOK": f"http://127.0.0.1:x{SECRET}/hook"}),
        # A control character: urllib quotes the path in its error.
        ({"type": "webhook", "url_env": "HOOK"}, {"HOOK": f"http://127.0.0.1:9/services/{SECRET}\x7f/x"}),
    ],
)
def test_alert_failure_logs_never_show_the_secret(capsys, channel, env):
    out = _delivered_logs(capsys, channel, env)
    assert SECRET not in out
    assert "/services/T0" not in out


def test_channel_secrets_cover_every_secret_option():
    built = channels.build(
        Settings.from_mapping({"alerts": ALERTS}, env={}).alert_channels,
        {},
    )
    secrets = [channel_secrets(channel) for channel in built]
    assert f"https://hooks.slack.com/services/T0/B0/{SECRET}" in secrets[0]
    assert SECRET in secrets[0]  # the path's last segment alone
    assert SECRET in secrets[1]  # a header value
    assert {SECRET, SECRET + "2"} <= set(secrets[2])
    assert SECRET in secrets[3]


def test_dedup_store_errors_are_redacted(capsys):
    def claim(_digest: str) -> bool:
        raise OSError(f"Error connecting to redis://:{SECRET}@h:6379/0")

    settings = Settings.from_mapping({"alerts": ALERTS}, env={})
    logs.configure("info", "json", stream=sys.stdout)
    alerts = Alerts(settings, [], host="n1", claim=claim)
    assert alerts._claimed(Alert("critical", "e", "s", "n1", 0.0, lock_key="k"))
    out = capsys.readouterr().out
    assert "alert_dedup_unavailable" in out
    assert SECRET not in out
