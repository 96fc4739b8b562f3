"""deploy/kubernetes/: every manifest validates offline (the Kubernetes API's JSON schemas; the PodMonitor,
a CRD, by the fields it may have), the pieces fit together, and each ConfigMap's monitor.yml passes
`gpulock-monitor config check`."""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from helpers import config_file, start_daemon, stop_daemon, wait_for
from kubernetes_validate import utils as kubernetes_schemas

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
OLDEST = "1.28"
NEWEST = kubernetes_schemas.latest_version()
WORKLOADS = ("Deployment", "DaemonSet")


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] in WORKLOADS]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def config_of(workload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ConfigMap's monitor.yml a workload runs with: its text and what it says."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(workload)["volumeMounts"]}
    args = container(workload)["args"]
    path = PurePosixPath(args[args.index("--config") + 1])
    config_map = named("ConfigMap", volumes[mounts[str(path.parent)]]["configMap"]["name"])
    text = config_map["data"][path.name]
    return text, yaml.safe_load(text)


def mount_of(workload: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount that holds `path` in the workload's container, and its volume."""
    mounts = [m for m in container(workload)["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    return mount, volumes[mount["name"]]


# --- schemas -------------------------------------------------------------------------------------------


def test_the_manifests_are_there():
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds == ["ConfigMap", "ConfigMap", "DaemonSet", "Deployment", "PodMonitor", "Secret"]


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize(
    ("where", "doc"),
    [(w, d) for w, d in manifests() if d["kind"] != "PodMonitor"],
    ids=[w for w, d in manifests() if d["kind"] != "PodMonitor"],
)
def test_validates_against_the_kubernetes_schema(where, doc, version):
    # strict: a field the API does not know (a typo) is an error, as `kubectl apply` makes it one.
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_typo():
    doc = copy.deepcopy(named("Deployment", "gpulock-monitor"))
    container(doc)  # the test's own precondition: one container
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFilesytem"):
        kubernetes_validate.validate(doc, OLDEST, strict=True)


# The PodMonitor is a prometheus-operator CRD, which kubernetes-validate has no schema for, and no package
# on PyPI carries its schema without more (one that does loads a pytest plugin of its own): these are the
# CRD's fields (monitoring.coreos.com/v1, as of prometheus-operator 0.80) that a PodMonitor here may use,
# and the form of its durations.
PODMONITOR_SPEC = {
    "jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector", "podTargetLabels", "sampleLimit",
    "targetLimit", "attachMetadata", "scrapeClass",
}  # fmt: skip
PODMONITOR_ENDPOINT = {
    "port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "honorTimestamps",
    "relabelings", "metricRelabelings", "params", "filterRunning",
}  # fmt: skip
DURATION = re.compile(r"(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)")


def test_podmonitor_has_only_fields_of_the_crd():
    (doc,) = of_kind("PodMonitor")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    # Its metadata is any object's: the schema of a ConfigMap's checks it.
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, OLDEST, strict=True
    )
    spec = doc["spec"]
    assert set(spec) <= PODMONITOR_SPEC, set(spec) - PODMONITOR_SPEC
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert isinstance(spec["jobLabel"], str)
    assert spec["podMetricsEndpoints"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= PODMONITOR_ENDPOINT, set(endpoint) - PODMONITOR_ENDPOINT
        for key in ("interval", "scrapeTimeout"):
            assert DURATION.fullmatch(endpoint[key]), endpoint[key]
        assert endpoint["path"].startswith("/")
    # A scrape must end before the next begins.
    (endpoint,) = spec["podMetricsEndpoints"]
    assert int(endpoint["scrapeTimeout"][:-1]) < int(endpoint["interval"][:-1])


# --- how the pieces fit --------------------------------------------------------------------------------


def test_podmonitor_scrapes_every_monitor_pod_as_the_rules_expect():
    (monitor,) = of_kind("PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    # The job is named after the pods' label; deploy/prometheus/rules.yml selects job gpulock-monitor.
    rules = (REPO / "deploy" / "prometheus" / "rules.yml").read_text()
    assert 'job=~"(.+/)?gpulock-monitor"' in rules
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
        assert labels[monitor["spec"]["jobLabel"]] == "gpulock-monitor"
        ports = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
        # A workload's selector picks its own pods only.
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("workload", workloads(), ids=[w["kind"] for w in workloads()])
def test_workload_is_locked_down(workload):
    pod = workload["spec"]["template"]["spec"]
    main = container(workload)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"cpu", "memory"} <= main["resources"]["requests"].keys()
    assert "memory" in main["resources"]["limits"]
    assert not [e for e in main.get("env", []) if re.search("PASSWORD|SECRET|TOKEN", e["name"])]


@pytest.mark.parametrize("workload", workloads(), ids=[w["kind"] for w in workloads()])
def test_workload_runs_the_monitor_with_its_config(workload):
    main = container(workload)
    assert "command" not in main  # the image's ENTRYPOINT: gpulock-monitor run
    text, config = config_of(workload)
    # Probes and Prometheus reach the metrics port from outside the pod.
    host, _, port = config["metrics"]["listen"].rpartition(":")
    assert config["metrics"]["enabled"] is True
    assert host == "0.0.0.0"  # noqa: S104 - in a pod, loopback is the pod's own
    (metrics_port,) = [p for p in main["ports"] if p["name"] == "metrics"]
    assert metrics_port["containerPort"] == int(port)
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The Redis password: a file from the Secret, never the environment or the URL.
    password_file = config["redis"]["password_file"]
    mount, volume = mount_of(workload, password_file)
    assert mount["readOnly"] is True
    secret = named("Secret", volume["secret"]["secretName"])
    assert PurePosixPath(password_file).name in secret["stringData"]
    assert "password" not in config["redis"]
    assert urlsplit(config["redis"]["url"]).password is None
    # The root file system is read-only: the audit files live on a volume big enough for their rotation.
    audit = config["audit"]
    for key in ("path", "critical_path"):
        mount, volume = mount_of(workload, audit[key])
        assert not mount.get("readOnly")
        size = volume["emptyDir"]["sizeLimit"]
        assert size.endswith("Mi")
        assert 2 * (audit["backups"] + 1) * audit["max_bytes"] <= int(size[:-2]) << 20
    assert config["logging"]["format"] == "json"  # the pod's log is collected, not read on a terminal
    assert text.strip()


def test_gpu_variant_sees_the_nodes_gpus():
    (daemonset,) = of_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container(daemonset)["env"]}
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"]
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]["value"]  # NVML
    # No GPU is requested: the monitor must not take one from the workers.
    assert "nvidia.com/gpu" not in str(container(daemonset)["resources"])
    _, config = config_of(daemonset)
    assert config["nvml"]["enabled"] is True
    # Each node's monitor watches the locks of its own GPUs: NODE_NAME comes from the downward API.
    assert "${NODE_NAME}" in config["gpu_lock"]["key_pattern"]
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    (deployment,) = of_kind("Deployment")
    assert "runtimeClassName" not in deployment["spec"]["template"]["spec"]
    assert config_of(deployment)[1]["nvml"]["enabled"] is False


# --- config check ---------------------------------------------------------------------------------------


def config_check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", "config", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("workload", workloads(), ids=[w["kind"] for w in workloads()])
def test_configmap_passes_config_check(workload, tmp_path):
    text, config = config_of(workload)
    path = tmp_path / "monitor.yml"
    path.write_text(text)
    env = {"NODE_NAME": "gpu-node-7"} if workload["kind"] == "DaemonSet" else {}
    result = config_check(path, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config ok\n"
    # Warnings: those the repository's own monitor.yml gets (the default tiers), and the password file,
    # which exists only inside the pod.
    reference = config_check(REPO / "monitor.yml")
    assert reference.returncode == 0, reference.stderr
    expected = set(reference.stderr.splitlines()) | {
        f"warning: redis.password_file: cannot read {config['redis']['password_file']}: FileNotFoundError"
    }
    assert set(result.stderr.splitlines()) <= expected, result.stderr
    if workload["kind"] == "DaemonSet":  # without the downward API's variable it is refused, by name
        unset = config_check(path)
        assert unset.returncode != 0
        assert "NODE_NAME" in unset.stderr


# --- the probes ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # not listening yet
        return 0


def test_the_probes_paths_are_served(redis_server, tmp_path):
    # The kubelet restarts the pod when /livez fails and routes nothing to it while /readyz fails: a path
    # the daemon does not serve would restart a healthy monitor forever.
    probes = {
        (probe["httpGet"]["path"], probe["httpGet"]["port"])
        for workload in workloads()
        for probe in (container(workload)["livenessProbe"], container(workload)["readinessProbe"])
    }
    assert {port for _, port in probes} == {"metrics"}
    port = _free_port()
    config = config_file(tmp_path, redis_server.url, metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    proc = start_daemon(config)
    try:
        wait_for(lambda: _get(port, "/metrics") == 200)
        codes: dict[str, int] = {}
        deadline = time.monotonic() + 15  # ready once the first pass is done: well within this
        while time.monotonic() < deadline and set(codes.values()) != {200}:
            codes = {path: _get(port, path) for path, _ in probes}
            time.sleep(0.05)
    finally:
        code, output = stop_daemon(proc)
    assert code == 0, output
    assert codes == {"/livez": 200, "/readyz": 200}
