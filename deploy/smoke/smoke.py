#!/usr/bin/env python3
"""Smoke test of the Kubernetes manifests without a cluster.

Renders the dev overlay, takes the Redis and Sentinel containers' commands,
scripts, probes, preStop hooks and environment from the rendered
StatefulSets and ConfigMaps, and the server's and offloader's environment
from their Deployments, and runs each "pod" as local processes:

- its own network namespace, joined by a veth pair to a bridge in another
  namespace this test creates, with a private address that exists only
  inside these namespaces;
- its own mount namespace, with its volume directory on /data, its
  ConfigMap's files on /config, a read-only root file system when the
  manifest asks for one, and a hosts file on /etc/hosts that maps the
  headless services' names (fully qualified and short) to the pods'
  current addresses, standing in for cluster DNS;
- the container's user and group (setpriv), no new privileges, and the
  environment the manifest gives it (secrets from test values, the
  downward API's fields filled in, $(VAR) references expanded as the
  kubelet does).

It then runs the scenarios in SCENARIOS and prints a table of results and
timings. deploy/README.md ("The smoke test") describes what it covers and
what it does not.

Usage (as root): deploy/smoke/run.sh path/to/server [--keep]
Without the privileges to create namespaces it prints "skipped: ..." and
exits 0. Every process and namespace it creates is removed on exit,
also on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

try:
    import yaml
except ImportError:  # run.sh installs it; say so rather than a traceback
    sys.exit("smoke.py needs PyYAML: run it through deploy/smoke/run.sh")

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "deploy/k8s/overlays/dev"
BASE = REPO / "deploy/k8s/base"
CLUSTER_DOMAIN = "cluster.local"
MASTER_NAME = "mymaster"
# Private addresses used only inside the namespaces this test creates.
SUBNET = "10.213.0"
PREFIX = f"tkvsmoke{os.getpid()}"
# The image's entry point stands for the binary under test.
PROJECT_IMAGE = "tenant-kv-server"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The kubelet's restart back-off: 10 s, doubling, capped (here at 40 s,
# far beyond any scenario's budget).
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 40.0
START = time.monotonic()
# Absolute paths of the host's tools (filled in by preflight): inside a pod's
# mount namespace PATH may lead to busybox's applets instead.
TOOLS: dict[str, str] = {}


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {message}", flush=True)


class Skip(Exception):
    """The machine cannot run the test (privileges, kernel features)."""


class Failed(Exception):
    """A scenario's check failed; the message says which and why."""


# --------------------------------------------------------------------------
# The manifests


def render() -> tuple[list[dict], str]:
    """The dev overlay's resources, rendered by kustomize when kubectl is
    there; otherwise the base's resource files with the overlay's namespace
    (the overlay's patches only touch replica counts and pull policies,
    which this test does not use)."""
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(OVERLAY)], check=True, capture_output=True, text=True
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d], "kubectl kustomize deploy/k8s/overlays/dev"
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = []
    for name in base["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc:
                doc["metadata"]["namespace"] = overlay["namespace"]
                docs.append(doc)
    return docs, "base resource files (no kubectl), namespace from the dev overlay"


def find(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise Failed(f"the rendered manifests have no {kind} {name}")


QUANTITY = re.compile(r"^([0-9.]+)([A-Za-z]*)$")
SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 0.001,
}


def quantity(text) -> float:
    match = QUANTITY.match(str(text))
    if not match or match.group(2) not in SUFFIXES:
        raise Failed(f"cannot read the quantity {text!r}")
    return float(match.group(1)) * SUFFIXES[match.group(2)]


def expand(value: str, env: dict) -> str:
    """The kubelet's $(VAR) expansion: defined variables are replaced, $$
    stands for $, anything else is left as written."""
    def one(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


# --------------------------------------------------------------------------
# Namespaces and sockets inside them

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def run(*argv: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout, **kwargs)


def netns_socket(netns: str) -> socket.socket:
    """A TCP socket created inside `netns`. setns() moves only the calling
    thread, and a socket stays in the namespace it was created in, so the
    thread switches in, creates it, and switches back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                # A thread stuck in the wrong namespace would send the rest
                # of the test's traffic astray: stop at once.
                os._exit(f"cannot return to the host's network namespace: errno {ctypes.get_errno()}")
    finally:
        os.close(home)
        os.close(target)


class RespError(Exception):
    pass


class Resp:
    """A minimal Redis protocol client over a socket in a namespace."""

    def __init__(self, netns: str, ip: str, port: int, password: str | None, timeout: float = 3.0):
        self.sock = netns_socket(netns)
        self.sock.settimeout(timeout)
        self.file = None
        try:
            self.sock.connect((ip, port))
            self.file = self.sock.makefile("rb")
            if password:
                self.call("AUTH", password)
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.file:
            self.file.close()
        self.sock.close()

    def call(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self.read()

    def read(self):
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed")
        kind, rest = line[:1], line[1:-2].decode(errors="replace")
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            if rest == "-1":
                return None
            data = self.file.read(int(rest) + 2)
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            if rest == "-1":
                return None
            return [self.read() for _ in range(int(rest))]
        raise ConnectionError(f"unexpected reply {line!r}")


# --------------------------------------------------------------------------
# Pods


class Pod:
    """One pod: its namespaces, volumes, environment and main process."""

    def __init__(self, test: "Smoke", name: str, pod_spec: dict, claims: list[str],
                 namespace: str, ip: str, hostnames: list[str]):
        self.test = test
        self.name = name
        self.spec = pod_spec
        self.container = pod_spec["containers"][0]
        self.namespace = namespace
        self.ip = ip
        self.hostnames = hostnames
        self.netns = f"{PREFIX}-{name}"
        self.proc: subprocess.Popen | None = None
        self.want_running = False
        self.restarts = 0
        self.lock = threading.RLock()
        self.next_start = 0.0
        self.backoff = BACKOFF_FIRST
        self.killed_at_grace = False
        self.logfile = test.logs / f"{name}.log"
        security = pod_spec.get("securityContext", {})
        container_security = self.container.get("securityContext", {})
        self.uid = container_security.get("runAsUser", security.get("runAsUser", 0))
        self.gid = container_security.get("runAsGroup", security.get("runAsGroup", self.uid))
        self.fs_group = security.get("fsGroup")
        self.read_only_root = container_security.get("readOnlyRootFilesystem", False)
        self.no_new_privs = container_security.get("allowPrivilegeEscalation") is False
        if security.get("runAsNonRoot") and self.uid == 0:
            raise Failed(f"{name}: runAsNonRoot without a non-zero runAsUser: the kubelet refuses it")
        # Volumes: claims get a directory kept across restarts, ConfigMaps
        # their files, emptyDirs a fresh directory at every start.
        self.mounts: list[tuple[Path, str, bool]] = []
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            vname = mount["name"]
            if vname in claims:
                source = test.root / "volumes" / f"{vname}-{name}"
                source.mkdir(parents=True, exist_ok=True)
                os.chown(source, self.uid, self.fs_group if self.fs_group is not None else self.gid)
                source.chmod(0o2770)
            elif "configMap" in volumes.get(vname, {}):
                source = test.configmap_dir(volumes[vname]["configMap"]["name"])
            elif "emptyDir" in volumes.get(vname, {}):
                source = test.root / "emptydir" / f"{name}-{vname}"
            else:
                raise Failed(f"{name}: volume {vname} is of a kind this test does not provide")
            self.mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))

    # The container's environment, as the kubelet builds it.
    def env(self) -> dict:
        env = {"PATH": DEFAULT_PATH, "HOSTNAME": self.name, "HOME": "/"}
        for item in self.container.get("env", []):
            name = item["name"]
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[name] = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                             "status.podIP": self.ip}[path]
            elif "resourceFieldRef" in source:
                ref = source["resourceFieldRef"]
                kind, resource = ref["resource"].split(".")
                amount = quantity(self.container["resources"][kind][resource])
                divisor = quantity(ref.get("divisor", "1"))
                env[name] = str(int(-(-amount // divisor)))
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                key = (ref["name"], ref["key"])
                if key not in self.test.secrets:
                    raise Failed(f"{self.name}: the secret {key[0]} has no key {key[1]} "
                                 f"(the pod would not start: CreateContainerConfigError)")
                env[name] = self.test.secrets[key]
            else:
                raise Failed(f"{self.name}: env {name} comes from a source this test does not provide")
        return env

    def setpriv(self) -> list[str]:
        argv = [TOOLS["setpriv"], f"--reuid={self.uid}", f"--regid={self.gid}"]
        argv.append(f"--groups={self.fs_group}" if self.fs_group is not None else "--clear-groups")
        if self.no_new_privs:
            argv.append("--no-new-privs")
        if "ALL" in self.container.get("securityContext", {}).get("capabilities", {}).get("drop", []):
            argv += ["--inh-caps=-all", "--bounding-set=-all"]
        return argv + ["--"]

    def argv(self) -> list[str]:
        image = self.container["image"].split("@")[0].rsplit(":", 1)[0]
        command = self.container.get("command")
        args = self.container.get("args", [])
        if command is None:
            if image != PROJECT_IMAGE:
                raise Failed(f"{self.name}: no command, and the entry point of {image} is unknown here")
            command = [str(self.test.server_bin)]
        env = self.env()
        return [expand(a, env) for a in command + args]

    def start(self) -> None:
        with self.lock:
            if self.alive():
                raise Failed(f"{self.name} is already running")
            mount = TOOLS["mount"]
            lines = ["set -e"]
            if self.test.busybox and "alpine" in self.container["image"]:
                # Alpine's userland: busybox's shell and tools before the
                # host's (Redis's own programs are not among them).
                lines.append(f"{mount} --bind {shlex.quote(str(self.test.busybox))} /usr/local/bin")
                lines.append(f"{mount} --bind {TOOLS['busybox']} /bin/sh")
            for source, target, read_only in self.mounts:
                if source.parent.name == "emptydir":
                    shutil.rmtree(source, ignore_errors=True)
                    source.mkdir(parents=True)
                    os.chown(source, self.uid, self.fs_group or self.gid)
                self.test.mount_point(target, directory=source.is_dir())
                lines.append(f"{mount} --bind {shlex.quote(str(source))} {shlex.quote(target)}")
                if read_only:
                    lines.append(f"{mount} -o remount,bind,ro {shlex.quote(target)}")
            lines.append(f"{mount} --bind {shlex.quote(str(self.test.hosts))} /etc/hosts")
            if self.read_only_root:
                lines.append(f"{mount} -o remount,bind,ro /")
            lines.append("cd /")
            lines.append("exec " + " ".join(shlex.quote(a) for a in self.setpriv() + self.argv()))
            argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                    "--", "sh", "-c", "\n".join(lines)]
            with open(self.logfile, "a") as out:
                out.write(f"===== {self.name} started at {time.monotonic() - START:.1f}s\n")
                out.flush()
                self.proc = subprocess.Popen(argv, env=self.env(), stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.want_running = True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a node's loss or the OOM killer: no preStop, no
        graceful shutdown. The pod stays down until started again."""
        with self.lock:
            self.want_running = False
            if self.proc is not None:
                kill_group(self.proc.pid)
                self.proc.wait(timeout=10)

    def stop(self, pre_stop: bool = False) -> float:
        """The kubelet's container stop: the preStop hook when asked for,
        then SIGTERM, and SIGKILL once the grace period is over. Returns the
        preStop hook's duration."""
        with self.lock:
            self.want_running = False
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        began = time.monotonic()
        hook_time = 0.0
        if pre_stop and self.container.get("lifecycle", {}).get("preStop"):
            hook = self.container["lifecycle"]["preStop"]["exec"]["command"]
            self.exec(hook, timeout=grace)
            hook_time = time.monotonic() - began
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            self.killed_at_grace = False
            try:
                self.proc.wait(timeout=max(1.0, grace - (time.monotonic() - began)))
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running after the grace period: SIGKILL")
                self.killed_at_grace = True
            kill_group(self.proc.pid)
            self.proc.wait(timeout=10)
        return hook_time

    def exec(self, command: list[str], timeout: float, stdin: str | None = None) -> subprocess.CompletedProcess:
        """A command in the running container (kubectl exec, exec probes,
        hooks): its namespaces, user and environment."""
        if not self.alive():
            return subprocess.CompletedProcess(command, 126, "", f"{self.name} is not running")
        argv = [TOOLS["nsenter"], f"--target={self.proc.pid}", "--net", "--mount", "--"] + self.setpriv() + command
        try:
            return subprocess.run(argv, env=self.env(), input=stdin, capture_output=True, text=True,
                                  timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, 124, "", "timed out")

    def probe(self, which: str) -> bool:
        spec = self.container.get(which)
        if spec is None:
            return self.alive()
        timeout = spec.get("timeoutSeconds", 1)
        if "exec" in spec:
            return self.exec(spec["exec"]["command"], timeout=timeout).returncode == 0
        if "httpGet" in spec:
            port = spec["httpGet"]["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in self.container["ports"] if p["name"] == port)
            status, _ = self.test.http_to(self.ip, port, "GET", spec["httpGet"]["path"], timeout=timeout)
            return 200 <= status < 400
        raise Failed(f"{self.name}: {which} is of a kind this test does not run")

    def startup_budget(self) -> float:
        """How long the kubelet lets the container start: the startup probe
        fails failureThreshold times, periodSeconds apart, after
        initialDelaySeconds, before the container is killed."""
        spec = self.container.get("startupProbe")
        if spec is None:
            return 0.0
        return (spec.get("initialDelaySeconds", 0)
                + spec.get("periodSeconds", 10) * (spec.get("failureThreshold", 3) - 1))


def stop_all(pods: list[Pod]) -> None:
    """Every pod stopped at once (SIGTERM, no preStop), as when all the
    nodes restart together."""
    threads = [threading.Thread(target=pod.stop) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# The test bed


class Smoke:
    def __init__(self, server_bin: Path, keep: bool):
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="tenant-kv-smoke-"))
        # The pods' users must reach their volumes and the binary.
        self.root.chmod(0o755)
        self.logs = self.root / "logs"
        self.logs.mkdir()
        (self.root / "bin").mkdir()
        # A copy: the path given may be rebuilt while the test runs.
        self.server_bin = self.root / "bin" / "server"
        shutil.copy2(server_bin, self.server_bin)
        self.server_bin.chmod(0o755)
        self.hosts = self.root / "hosts"
        # The Redis image is Alpine's: with busybox here, its scripts run
        # under busybox's sh, sed, awk, timeout... as they would there.
        self.busybox: Path | None = None
        if "busybox" in TOOLS:
            self.busybox = self.root / "busybox"
            self.busybox.mkdir()
            applets = run(TOOLS["busybox"], "--list").stdout.split()
            for applet in applets:
                (self.busybox / applet).symlink_to(TOOLS["busybox"])
        self.created_mount_points: list[Path] = []
        self.namespaces: list[str] = []
        self.pods: dict[str, Pod] = {}
        self.next_ip = 10
        self.stop_supervisor = threading.Event()
        self.supervisor = threading.Thread(target=self.supervise, daemon=True)
        self.loki: subprocess.Popen | None = None
        self.loki_file = self.root / "loki-pushes"
        self.bridge = f"{PREFIX}-net"
        self.client = f"{PREFIX}-client"
        self.loki_ns = f"{PREFIX}-loki"
        self.veths = 0
        # Test values for the secret's keys, new for every run.
        self.secrets = {
            ("kv-secrets", "redis-password"): secrets.token_hex(24),
            ("kv-secrets", "sentinel-password"): secrets.token_hex(24),
            ("kv-secrets", "jwt-secret"): secrets.token_hex(32),
            ("kv-secrets", "encryption-key"): secrets.token_hex(32),
            ("kv-secrets", "cursor-secret"): secrets.token_hex(32),
        }
        self.redis_password = self.secrets[("kv-secrets", "redis-password")]
        self.sentinel_password = self.secrets[("kv-secrets", "sentinel-password")]
        self.user = ("smoke-alice", secrets.token_hex(12), "acme")
        self.token: str | None = None
        self.acknowledged: dict[str, str] = {}
        self.key_counter = 0

    # ---- namespaces and addresses

    def new_ip(self) -> str:
        ip = f"{SUBNET}.{self.next_ip}"
        self.next_ip += 1
        return ip

    def add_netns(self, name: str, ip: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.veths += 1
        veth = f"v{self.veths}"
        run("ip", "-n", self.bridge, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "-n", self.bridge, "link", "set", veth, "master", "br0", "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", name, "link", "set", "eth0", "up")

    def setup_network(self) -> None:
        run("ip", "netns", "add", self.bridge)
        self.namespaces.append(self.bridge)
        run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        self.add_netns(self.client, f"{SUBNET}.2")
        self.add_netns(self.loki_ns, f"{SUBNET}.3")

    def readdress(self, pod: Pod) -> str:
        """A re-created pod: a new address in its namespace."""
        old = pod.ip
        pod.ip = self.new_ip()
        run("ip", "-n", pod.netns, "addr", "del", f"{old}/24", "dev", "eth0")
        run("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        self.write_hosts()
        return old

    def mount_point(self, target: str, directory: bool) -> None:
        """A bind mount needs its target to exist; one the host lacks is
        made for the test and removed at the end."""
        path = Path(target)
        if path.exists():
            return
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for item in reversed(missing):
            if item == Path(target) and not directory:
                item.touch()
            else:
                item.mkdir()
            self.created_mount_points.append(item)

    def configmap_dir(self, name: str) -> Path:
        path = self.root / "configmaps" / name
        if not path.exists():
            path.mkdir(parents=True)
            for key, value in find(self.docs, "ConfigMap", name)["data"].items():
                (path / key).write_text(value)
                (path / key).chmod(0o644)
        return path

    def write_hosts(self) -> None:
        """Cluster DNS for the pods. Rewritten in place (the pods see the
        file through bind mounts of this inode), in one write of a fixed
        size, so that a reader never sees it half written."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        for pod in self.pods.values():
            lines.append(" ".join([pod.ip] + pod.hostnames))
        ns = self.namespace
        lines.append(f"{SUBNET}.3 loki.{ns}.svc.{CLUSTER_DOMAIN} loki.{ns}.svc loki.{ns} loki")
        text = "\n".join(lines) + "\n"
        size = 8192
        if len(text) > size - 2:
            raise Failed("the hosts file outgrew its fixed size")
        text += "#" * (size - len(text) - 1) + "\n"
        fd = os.open(self.hosts, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, text.encode(), 0)
        finally:
            os.close(fd)

    # ---- pods

    def build(self) -> None:
        self.docs, self.source = render()
        sets = {name: find(self.docs, "StatefulSet", name) for name in ("redis", "sentinel")}
        self.namespace = sets["redis"]["metadata"]["namespace"]
        for name, sts in sets.items():
            service = sts["spec"]["serviceName"]
            claims = [c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])]
            for ordinal in range(sts["spec"]["replicas"]):
                pod = f"{name}-{ordinal}"
                base = f"{pod}.{service}"
                names = [f"{base}.{self.namespace}.svc.{CLUSTER_DOMAIN}", f"{base}.{self.namespace}.svc",
                         f"{base}.{self.namespace}", base, pod]
                self.pods[pod] = Pod(self, pod, sts["spec"]["template"]["spec"], claims, self.namespace,
                                     self.new_ip(), names)
        # One pod of each Deployment: enough to drive the service, and the
        # machine has two cores.
        for name in ("server", "offloader"):
            deployment = find(self.docs, "Deployment", name)
            pod = f"{name}-0"
            self.pods[pod] = Pod(self, pod, deployment["spec"]["template"]["spec"], [], self.namespace,
                                 self.new_ip(), [pod])
        self.redis = [p for n, p in self.pods.items() if n.startswith("redis-")]
        self.sentinels = [p for n, p in self.pods.items() if n.startswith("sentinel-")]
        self.server = self.pods["server-0"]
        self.offloader = self.pods["offloader-0"]
        for pod in self.pods.values():
            self.add_netns(pod.netns, pod.ip)
        self.write_hosts()

    def start_fake_loki(self) -> None:
        """Loki's push endpoint, counting pushes per tenant (X-Scope-OrgID),
        so the offloader's path from Redis to Loki is checked end to end."""
        code = (
            "import http.server, sys\n"
            "out = open(sys.argv[1], 'a', buffering=1)\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_POST(self):\n"
            "        self.rfile.read(int(self.headers.get('Content-Length') or 0))\n"
            "        out.write((self.headers.get('X-Scope-OrgID') or '-') + '\\n')\n"
            "        self.send_response(204); self.end_headers()\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'ready')\n"
            "    def log_message(self, *args):\n"
            "        pass\n"
            "http.server.ThreadingHTTPServer(('0.0.0.0', 3100), H).serve_forever()\n"
        )
        with open(self.logs / "loki.log", "a") as out:
            self.loki = subprocess.Popen(["ip", "netns", "exec", self.loki_ns, sys.executable, "-c", code,
                                          str(self.loki_file)], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def supervise(self) -> None:
        """restartPolicy: Always. A container that exits while it should
        run is started again after the kubelet's back-off."""
        while not self.stop_supervisor.wait(0.2):
            for pod in self.pods.values():
                with pod.lock:
                    if not pod.want_running or pod.proc is None or pod.proc.poll() is None:
                        continue
                    now = time.monotonic()
                    if pod.next_start == 0.0:
                        pod.next_start = now + pod.backoff
                        log(f"{pod.name} exited with status {pod.proc.returncode}; "
                            f"restarting in {pod.backoff:.0f}s")
                        pod.backoff = min(pod.backoff * 2, BACKOFF_MAX)
                    elif now >= pod.next_start:
                        pod.next_start = 0.0
                        pod.restarts += 1
                        pod.start()

    def cleanup(self) -> None:
        self.stop_supervisor.set()
        for pod in self.pods.values():
            pod.want_running = False
            if pod.proc is not None:
                kill_group(pod.proc.pid)
        if self.loki is not None:
            kill_group(self.loki.pid)
        # Whatever else runs in the namespaces (a hook's or a script's
        # children in process groups of their own, like timeout's).
        for ns in self.namespaces:
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pod in self.pods.values():
            if pod.proc is not None:
                try:
                    pod.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        for path in reversed(self.created_mount_points):
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass
        if self.keep:
            print(f"kept {self.root} (logs in {self.logs})")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- talking to the pods (from the client namespace)

    def rcall(self, pod: Pod, *args, port: int | None = None, timeout: float = 3.0,
              password: str | None = None):
        """A command to a Redis node or a sentinel; None when it does not
        answer (refused, timed out, an error reply)."""
        sentinel = pod in self.sentinels
        port = port or (26379 if sentinel else 6379)
        if password is None:
            password = self.sentinel_password if sentinel else self.redis_password
        try:
            conn = Resp(self.client, pod.ip, port, password, timeout)
        except (OSError, RespError, ConnectionError):
            return None
        try:
            return conn.call(*args)
        except (OSError, RespError, ConnectionError):
            return None
        finally:
            conn.close()

    def http_to(self, ip: str, port: int, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 15.0) -> tuple[int, bytes]:
        try:
            sock = netns_socket(self.client)
            sock.settimeout(timeout)
            sock.connect((ip, port))
        except OSError as error:
            return 0, str(error).encode()
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        conn.sock = sock
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            return 0, str(error).encode()
        finally:
            conn.close()

    def api(self, method: str, path: str, body=None, form=None, timeout: float = 15.0) -> tuple[int, dict]:
        headers = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        status, raw = self.http_to(self.server.ip, 8080, method, path, data, headers, timeout)
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, {"raw": raw[:200].decode(errors="replace")}

    def write(self, prefix: str) -> tuple[bool, str]:
        """Creates a new key; an acknowledged one is remembered for the
        final check that every acknowledged write is still readable."""
        self.key_counter += 1
        key = f"{prefix}-{self.key_counter}"
        value = secrets.token_hex(8)
        status, body = self.api("POST", f"/data?key={key}", body={"value": value})
        if status == 201:
            self.acknowledged[key] = value
            return True, key
        return False, f"{status} {json.dumps(body)[:160]}"

    def read(self, key: str) -> tuple[bool, str]:
        status, body = self.api("GET", f"/data/{key}")
        if status == 200 and body.get("value") == self.acknowledged[key]:
            return True, ""
        return False, f"{status} {json.dumps(body)[:160]}"

    def login(self) -> None:
        self.token = None
        status, body = self.api("POST", "/token", form={"username": self.user[0], "password": self.user[1]})
        if status != 200 or "access_token" not in body:
            raise Failed(f"POST /token: {status} {body}")
        self.token = body["access_token"]

    # ---- the set's state

    def role(self, pod: Pod) -> tuple[str | None, str | None, str | None]:
        """(role, master's host, link state) of a data node, or Nones."""
        reply = self.rcall(pod, "ROLE")
        if not reply:
            return None, None, None
        if reply[0] == "master":
            return "master", None, None
        if reply[0] == "slave":
            return "slave", reply[1], reply[3]
        return reply[0], None, None

    def pod_of(self, host: str | None) -> Pod | None:
        if not host:
            return None
        return self.pods.get(host.split(".")[0])

    def sentinel_view(self, sentinel: Pod) -> dict | None:
        master = self.rcall(sentinel, "SENTINEL", "MASTER", MASTER_NAME)
        replicas = self.rcall(sentinel, "SENTINEL", "REPLICAS", MASTER_NAME)
        if not master or replicas is None:
            return None
        fields = dict(zip(master[::2], master[1::2]))
        healthy = []
        for replica in replicas:
            r = dict(zip(replica[::2], replica[1::2]))
            if r.get("flags") == "slave" and r.get("master-link-status") == "ok":
                healthy.append(r.get("name", "").split(":")[0].split(".")[0])
        return {"master": fields.get("ip", "").split(".")[0],
                "flags": fields.get("flags"), "config_epoch": int(fields.get("config-epoch", -1)),
                "other_sentinels": int(fields.get("num-other-sentinels", 0)),
                "healthy_replicas": sorted(healthy)}

    def converged(self, sentinels: list[Pod] | None = None) -> tuple[bool, str]:
        """One master, every other running data node its replica with the
        link up, and every given sentinel naming that master, seeing both
        replicas healthy and the other sentinels."""
        sentinels = self.sentinels if sentinels is None else sentinels
        roles = {p.name: self.role(p) for p in self.redis}
        masters = [n for n, r in roles.items() if r[0] == "master"]
        if len(masters) != 1:
            return False, f"masters: {masters or 'none'}; roles {roles}"
        master = masters[0]
        for name, (role, host, link) in roles.items():
            if name == master:
                continue
            target = self.pod_of(host)
            if role != "slave" or target is None or target.name != master or link != "connected":
                return False, f"{name}: {role} of {host} ({link})"
        replicas = sorted(n for n in roles if n != master)
        for sentinel in sentinels:
            view = self.sentinel_view(sentinel)
            if view is None:
                return False, f"{sentinel.name} does not answer"
            if view["master"] != master or view["flags"] != "master":
                return False, f"{sentinel.name} names {view['master']} ({view['flags']})"
            if view["healthy_replicas"] != replicas:
                return False, f"{sentinel.name} sees replicas {view['healthy_replicas']}"
            if view["other_sentinels"] != len(self.sentinels) - 1:
                return False, f"{sentinel.name} knows {view['other_sentinels']} other sentinels"
        return True, f"master {master}, replicas {', '.join(replicas)}"

    def config_epoch(self) -> int | None:
        for sentinel in self.sentinels:
            view = self.sentinel_view(sentinel)
            if view:
                return view["config_epoch"]
        return None

    def majority_master(self) -> str | None:
        names = []
        for sentinel in self.sentinels:
            reply = self.rcall(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME, timeout=1.0)
            if reply:
                names.append(reply[0].split(".")[0])
        for name in set(names):
            if names.count(name) >= len(self.sentinels) // 2 + 1:
                return name
        return None


def wait_for(what: str, condition, timeout: float, interval: float = 0.25):
    """Polls `condition` (returning (ok, detail) or a truthy value) until
    it holds; returns (seconds taken, last detail); raises Failed with the
    last detail after `timeout`."""
    began = time.monotonic()
    detail = ""
    while True:
        result = condition()
        ok, detail = result if isinstance(result, tuple) else (bool(result), "")
        if ok:
            return time.monotonic() - began, detail
        if time.monotonic() - began > timeout:
            raise Failed(f"{what}: not within {timeout:.0f}s ({detail})")
        time.sleep(interval)


# --------------------------------------------------------------------------
# Scenarios. Each returns (headline time, details) or raises Failed.


def started_within_budget(t: Smoke, pod: Pod, since: float) -> float:
    """Polls the pod's startup probe (more often than the kubelet, to time
    it) and fails if it does not pass within the kubelet's budget."""
    budget = pod.startup_budget()
    taken, _ = wait_for(f"{pod.name}'s startupProbe", lambda: pod.probe("startupProbe"),
                        timeout=budget - (time.monotonic() - since), interval=0.5)
    return time.monotonic() - since


def server_ready(t: Smoke):
    """The server's readinessProbe, as the Deployment defines it."""
    if t.server.probe("readinessProbe"):
        return True, ""
    status, body = t.api("GET", "/readyz", timeout=12)
    return False, f"readinessProbe failing; /readyz on the public port: {status} {body}"


def write_until_ok(t: Smoke, prefix: str, timeout: float) -> tuple[float, int, str]:
    """Writes new keys one after another until one is acknowledged:
    (seconds until then, failed attempts, last failure)."""
    began = time.monotonic()
    failures, last = 0, ""
    while time.monotonic() - began < timeout:
        ok, detail = t.write(prefix)
        if ok:
            return time.monotonic() - began, failures, last
        failures += 1
        last = detail
        time.sleep(0.2)
    raise Failed(f"no write acknowledged within {timeout:.0f}s ({failures} failed; last: {last})")


def scenario_first_boot(t: Smoke):
    began = time.monotonic()
    for pod in t.redis + t.sentinels + [t.server, t.offloader]:
        pod.start()
    details = []
    for pod in t.redis:
        details.append(f"{pod.name} started {started_within_budget(t, pod, began):.1f}s")
    taken, state = wait_for("the set converging", t.converged, timeout=60)
    converge = time.monotonic() - began
    master = state.split(",")[0].split()[-1]
    if master != "redis-0":
        raise Failed(f"first boot made {master} the master, not redis-0")
    limit = quantity(t.redis[0].container["resources"]["limits"]["memory"])
    maxmemory = t.rcall(t.redis[0], "CONFIG", "GET", "maxmemory")
    if not maxmemory or int(maxmemory[1]) != int(limit * 60 // 100):
        raise Failed(f"maxmemory is {maxmemory}, not 60% of the {limit:.0f}-byte limit")
    if t.rcall(t.redis[0], "CONFIG", "GET", "maxmemory-policy") != ["maxmemory-policy", "noeviction"]:
        raise Failed("maxmemory-policy is not noeviction")
    details.append(f"{state} after {converge:.1f}s; maxmemory 60% of the limit")
    wait_for("the server's readiness", lambda: server_ready(t), timeout=60, interval=1)
    user, password, tenant = t.user
    added = t.server.exec([str(t.server_bin), "user", "add", user, "--tenant", tenant], timeout=30,
                          stdin=password + "\n")
    if added.returncode != 0:
        raise Failed(f"server user add: {added.returncode} {added.stderr.strip()[-300:]}")
    t.login()
    _, failures, _ = write_until_ok(t, "boot", timeout=30)
    first_write = time.monotonic() - began
    key = list(t.acknowledged)[-1]
    ok, detail = t.read(key)
    if not ok:
        raise Failed(f"GET /data/{key}: {detail}")
    details.append(f"user added, token issued, first write acknowledged at {first_write:.1f}s and read back")
    return first_write, "; ".join(details)


def scenario_master_killed(t: Smoke):
    wait_for("a converged set before the kill", t.converged, timeout=30)
    write_until_ok(t, "before-kill", timeout=15)
    master = t.pods[t.majority_master()]
    switched: list[float] = []
    done = threading.Event()

    def watch():
        """When a majority of the sentinels name another master."""
        while not done.is_set() and not switched:
            if t.majority_master() not in (None, master.name):
                switched.append(time.monotonic() - killed)
            time.sleep(0.2)

    master.kill()
    killed = time.monotonic()
    log(f"SIGKILL {master.name} (the master); it stays down")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, failures, last = write_until_ok(t, "after-kill", timeout=40)
        resumed = time.monotonic() - killed
    except Failed as error:
        resumed, failures, last = None, 0, str(error)
    finally:
        done.set()
        watcher.join(timeout=10)
    sentinels = (f"the sentinels named {t.majority_master()} {switched[0]:.1f}s after the kill"
                 if switched else "the sentinels named no new master")
    if resumed is None:
        raise Failed(f"killed {master.name}; {sentinels}; {last}")
    detail = (f"killed {master.name}; {sentinels}; first write acknowledged {resumed:.1f}s after the "
              f"kill ({failures} failed before" + (f", last: {last})" if last else ")"))
    if resumed > 15:
        raise Failed(detail + "; the limit is 15s")
    return resumed, detail


def scenario_killed_master_rejoins(t: Smoke):
    down = [p for p in t.redis if not p.alive()]
    if not down:
        raise Failed("no Redis pod is down (the previous scenario did not run)")
    pod = down[0]
    began = time.monotonic()
    pod.start()
    started = started_within_budget(t, pod, began)
    wait_for(f"{pod.name} rejoining", t.converged, timeout=60)
    rejoined = time.monotonic() - began
    role = t.role(pod)
    return rejoined, (f"{pod.name} restarted: started {started:.1f}s, a replica of "
                      f"{role[1].split('.')[0]} with every sentinel agreeing after {rejoined:.1f}s")


def scenario_graceful_master_stop(t: Smoke):
    wait_for("a converged set", t.converged, timeout=60)
    master = t.pods[t.majority_master()]
    failures = []
    done = threading.Event()

    def writes():
        while not done.is_set():
            ok, detail = t.write("rolling")
            if not ok:
                failures.append(detail)
            time.sleep(0.2)

    writer = threading.Thread(target=writes, daemon=True)
    writer.start()
    try:
        began = time.monotonic()
        hook = master.stop(pre_stop=True)
        stopped = time.monotonic() - began
        if master.killed_at_grace:
            raise Failed(f"{master.name} ignored SIGTERM after its preStop hook ({hook:.1f}s) and was "
                         f"killed when the grace period ended")
        after = t.majority_master()
        if after is None or after == master.name:
            raise Failed(f"preStop of {master.name} ran {hook:.1f}s, then the sentinels still named {after}")
        master.start()
        started_within_budget(t, master, time.monotonic())
        wait_for(f"{master.name} rejoining", t.converged, timeout=60)
        total = time.monotonic() - began
    finally:
        done.set()
        writer.join(timeout=30)
    detail = (f"preStop of {master.name} switched the master to {after} in {hook:.1f}s, the pod "
              f"stopped at {stopped:.1f}s and was back as a replica at {total:.1f}s; writes meanwhile: "
              f"{len(failures)} failed" + (f" (last: {failures[-1]})" if failures else ""))
    return hook, detail


def ensure_master_not_redis0(t: Smoke) -> str:
    """A full restart only shows the first-boot fallback's old bug when the
    master is not redis-0: switch it away first if it is."""
    wait_for("a converged set", t.converged, timeout=60)
    if t.majority_master() == "redis-0":
        t.rcall(t.sentinels[0], "SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for("the switch away from redis-0",
                 lambda: (t.majority_master() not in (None, "redis-0"), t.majority_master()), timeout=30)
        wait_for("a converged set", t.converged, timeout=60)
    return t.majority_master()


def full_restart(t: Smoke, sentinels_first: bool):
    master = ensure_master_not_redis0(t)
    epoch = t.config_epoch()
    write_until_ok(t, "before-restart", timeout=15)
    kept = list(t.acknowledged)[-1]
    stop_all(t.redis + t.sentinels)
    killed = [p.name for p in t.redis + t.sentinels if p.killed_at_grace]
    began = time.monotonic()
    if sentinels_first:
        for pod in t.sentinels:
            pod.start()
        wait_for("the sentinels answering", lambda: all(p.probe("readinessProbe") for p in t.sentinels),
                 timeout=30, interval=0.5)
        order = f"sentinels up {time.monotonic() - began:.1f}s, then Redis"
        for pod in t.redis:
            pod.start()
    else:
        for pod in t.redis:
            pod.start()
        # The sentinels come 10 s later. Meanwhile no Redis pod may start
        # serving on its own: each waits for a sentinel majority.
        while time.monotonic() - began < 10:
            serving = [p.name for p in t.redis if t.role(p)[0] is not None]
            if serving:
                raise Failed(f"{serving} started serving before any sentinel was up")
            time.sleep(0.5)
        for pod in t.sentinels:
            pod.start()
        order = "Redis, then the sentinels 10s later"
    taken, state = wait_for("the set converging", t.converged, timeout=90)
    converge = time.monotonic() - began
    now_master = t.majority_master()
    new_epoch = t.config_epoch()
    if now_master != master or new_epoch != epoch:
        raise Failed(f"the master was {master} (config epoch {epoch}) and is now {now_master} "
                     f"(epoch {new_epoch}): a failover that was not needed")
    wait_for("the server's readiness", lambda: server_ready(t), timeout=60, interval=1)
    ok, detail = t.read(kept)
    if not ok:
        raise Failed(f"{kept}, written before the restart: {detail}")
    _, failures, _ = write_until_ok(t, "after-restart", timeout=30)
    written = time.monotonic() - began
    return converge, (f"{order}: {state} after {converge:.1f}s, the same master as before ({master}, "
                      f"config epoch {epoch}); data from before read back; a write acknowledged at "
                      f"{written:.1f}s" + (f"; SIGKILLed at the end of the grace period: {killed}"
                                           if killed else ""))


def scenario_restart_redis_first(t: Smoke):
    return full_restart(t, sentinels_first=False)


def scenario_restart_sentinels_first(t: Smoke):
    return full_restart(t, sentinels_first=True)


def scenario_rotated_passwords(t: Smoke):
    """New passwords in the Secret reach a running set when its pods
    restart, and what the sentinels learned (the master, the epoch) is
    kept."""
    wait_for("a converged set", t.converged, timeout=60)
    master = t.majority_master()
    epoch = t.config_epoch()
    write_until_ok(t, "before-rotation", timeout=15)
    kept = list(t.acknowledged)[-1]
    old = (t.redis_password, t.sentinel_password)
    stop_all(t.redis + t.sentinels + [t.server, t.offloader])
    for key in ("redis-password", "sentinel-password"):
        t.secrets[("kv-secrets", key)] = secrets.token_hex(24)
    t.redis_password = t.secrets[("kv-secrets", "redis-password")]
    t.sentinel_password = t.secrets[("kv-secrets", "sentinel-password")]
    began = time.monotonic()
    for pod in t.sentinels + t.redis + [t.server, t.offloader]:
        pod.start()
    wait_for("the set converging", t.converged, timeout=90)
    converge = time.monotonic() - began
    if t.majority_master() != master or t.config_epoch() != epoch:
        raise Failed(f"the master was {master} (epoch {epoch}), now {t.majority_master()} "
                     f"(epoch {t.config_epoch()})")
    for pod, password in ((t.redis[0], old[0]), (t.sentinels[0], old[1])):
        if t.rcall(pod, "PING", password=password) is not None:
            raise Failed(f"{pod.name} still takes the old password")
    wait_for("the server's readiness", lambda: server_ready(t), timeout=60, interval=1)
    ok, detail = t.read(kept)
    if not ok:
        raise Failed(f"{kept}, written before the rotation: {detail}")
    write_until_ok(t, "after-rotation", timeout=30)
    return converge, (f"both passwords changed, every pod restarted: the same master ({master}, epoch "
                      f"{epoch}) after {converge:.1f}s; the old passwords refused; data from before read "
                      f"back and a write acknowledged")


def scenario_hung_sentinel(t: Smoke):
    wait_for("a converged set", t.converged, timeout=60)
    hung = t.sentinels[0]
    master = t.majority_master()
    replica = next(p for p in t.redis if p.name != master)
    hung.signal(signal.SIGSTOP)
    try:
        replica.stop(pre_stop=True)
        began = time.monotonic()
        replica.start()
        started = started_within_budget(t, replica, began)
        wait_for(f"{replica.name} rejoining", lambda: t.converged(sentinels=t.sentinels[1:]), timeout=60)
        rejoined = time.monotonic() - began
    finally:
        hung.signal(signal.SIGCONT)
    return started, (f"{hung.name} stopped (SIGSTOP); {replica.name} restarted: startupProbe passed at "
                     f"{started:.1f}s (budget {replica.startup_budget():.0f}s), a replica again at "
                     f"{rejoined:.1f}s")


def scenario_new_address(t: Smoke):
    wait_for("a converged set", t.converged, timeout=60)
    master = t.majority_master()
    replica = next(p for p in t.redis if p.name != master)
    replica.kill()
    old = t.readdress(replica)
    began = time.monotonic()
    replica.start()
    started_within_budget(t, replica, began)
    wait_for(f"{replica.name} rejoining at its new address", t.converged, timeout=60)
    rejoined = time.monotonic() - began
    _, failures, _ = write_until_ok(t, "new-address", timeout=30)
    return rejoined, (f"{replica.name} killed, re-created at {replica.ip} (was {old}); a replica with "
                      f"every sentinel agreeing after {rejoined:.1f}s; a write waiting for both replicas "
                      f"acknowledged")


def scenario_acknowledged_readable(t: Smoke):
    wait_for("the server's readiness", lambda: server_ready(t), timeout=60, interval=1)
    missing = []
    for key in t.acknowledged:
        ok, detail = t.read(key)
        if not ok:
            missing.append(f"{key}: {detail}")
    if missing:
        raise Failed(f"{len(missing)} of {len(t.acknowledged)} acknowledged writes are not readable: "
                     + "; ".join(missing[:5]))
    return 0.0, f"all {len(t.acknowledged)} acknowledged writes read back"


def scenario_offloader(t: Smoke):
    if not t.offloader.alive():
        raise Failed("the offloader is not running")
    def shipped():
        tenants = set(t.loki_file.read_text().split()) if t.loki_file.exists() else set()
        return {"system", t.user[2]} <= tenants, f"pushes for {sorted(tenants) or 'no tenant'}"
    _, detail = wait_for("the offloader shipping to Loki", shipped, timeout=30, interval=1)
    return 0.0, f"running; {detail}"


SCENARIOS = [
    ("first boot", scenario_first_boot),
    ("master killed, kept down", scenario_master_killed),
    ("killed master restarted", scenario_killed_master_rejoins),
    ("master stopped (preStop)", scenario_graceful_master_stop),
    ("full restart: Redis first", scenario_restart_redis_first),
    ("full restart: sentinels first", scenario_restart_sentinels_first),
    ("passwords rotated, restart", scenario_rotated_passwords),
    ("hung sentinel, Redis restart", scenario_hung_sentinel),
    ("pod re-created, new address", scenario_new_address),
    ("acknowledged writes kept", scenario_acknowledged_readable),
    ("offloader ships logs", scenario_offloader),
]


# --------------------------------------------------------------------------


def preflight() -> None:
    """Raises Skip when this machine cannot create the namespaces."""
    if os.geteuid() != 0:
        raise Skip("not root: creating network and mount namespaces needs root")
    for tool in ("ip", "unshare", "nsenter", "setpriv", "mount", "redis-server", "redis-cli", "timeout",
                 "busybox"):
        if shutil.which(tool):
            TOOLS[tool] = shutil.which(tool)
    missing = [tool for tool in ("ip", "unshare", "nsenter", "setpriv", "mount", "redis-server",
                                 "redis-cli", "timeout") if tool not in TOOLS]
    if missing:
        raise Failed(f"missing tools: {', '.join(missing)} (.ci/run installs them)")
    probe = f"{PREFIX}-probe"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        raise Skip(f"cannot create a network namespace: {result.stderr.strip()}")
    run("ip", "netns", "del", probe, check=False)
    result = run("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                 "mount -o remount,bind,ro /", check=False)
    if result.returncode != 0:
        raise Skip(f"cannot create a mount namespace: {result.stderr.strip()}")


def running(pid: int) -> bool:
    """Whether the process lives (a zombie, killed but not yet reaped, does
    not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def remove_stale_namespaces() -> None:
    """Namespaces left by a run that was killed outright (SIGKILL leaves no
    chance to clean up): their owner's process id is gone."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(r"tkvsmoke(\d+)-", name)
        if match and not running(int(match.group(1))):
            for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run("ip", "netns", "del", name, check=False)


def missing_settings(server_bin: Path) -> list[str]:
    """Settings the manifests use that this server binary does not know
    (it ignores unknown SERVER_* variables, so they would pass silently)."""
    help_text = run(str(server_bin), "serve", "--help", check=False).stdout
    return [s for s in ("redis_sentinel_password", "redis_wait_replicas_min", "redis_replica_lost_after")
            if s not in help_text]


def run_scenarios(test: Smoke, only_option: str | None, unknown: list[str], results: list) -> None:
    log(f"manifests: {test.source}; namespace {test.namespace}; run directory {test.root}")
    if unknown:
        log(f"the server binary does not know {', '.join(unknown)} (not landed yet?)")
    test.start_fake_loki()
    test.supervisor.start()
    only = {int(n) for n in only_option.split(",")} if only_option else None
    for number, (name, scenario) in enumerate(SCENARIOS, 1):
        if only is not None and number not in only and number != 1:
            continue
        log(f"--- {number}. {name}")
        began = time.monotonic()
        try:
            headline, detail = scenario(test)
            results.append((name, "pass", headline, time.monotonic() - began, detail))
        except Failed as error:
            results.append((name, "FAIL", None, time.monotonic() - began, str(error)))
        except Exception as error:  # a bug in the test itself: report it, go on
            traceback.print_exc()
            results.append((name, "FAIL", None, time.monotonic() - began, f"error: {error!r}"))
        log(f"{results[-1][1]}: {results[-1][4]}")
        if number == 1 and results[-1][1] != "pass":
            log("first boot failed: the other scenarios need a running set; stopping here")
            break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server_bin", type=Path, help="the server binary (target/debug/server)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and volumes")
    parser.add_argument("--only", help="comma-separated scenario numbers to run (with those they need)")
    options = parser.parse_args()
    if not options.server_bin.is_file():
        print(f"smoke: no server binary at {options.server_bin}", file=sys.stderr)
        return 2
    try:
        preflight()
    except Skip as reason:
        print(f"smoke test skipped: {reason}")
        return 0
    except Failed as error:
        print(f"smoke test cannot run: {error}", file=sys.stderr)
        return 1

    # Ctrl-C, SIGTERM and SIGHUP unwind through the finally below.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    remove_stale_namespaces()
    unknown = missing_settings(options.server_bin)
    results = []
    test = Smoke(options.server_bin, options.keep)
    try:
        try:
            test.setup_network()
            test.build()
            ready = True
        except (Failed, subprocess.CalledProcessError) as error:
            results.append(("setting up the pods", "FAIL", None, 0.0, str(error)))
            ready = False
        if ready:
            run_scenarios(test, options.only, unknown, results)
    except KeyboardInterrupt as why:
        print(f"\ninterrupted ({why}): cleaning up", file=sys.stderr)
        results.append(("(interrupted)", "FAIL", None, 0.0, str(why)))
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        failed = any(r[1] != "pass" for r in results)
        if failed:
            for pod in test.pods.values():
                if pod.logfile.exists():
                    tail = pod.logfile.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- last lines of {pod.name}'s log (restarts: {pod.restarts})")
                    print("\n".join(tail))
        restarts = {p.name: p.restarts for p in test.pods.values() if p.restarts}
        if failed:
            # The run directory goes; its logs stay for whoever looks next.
            kept_logs = REPO / "target" / "smoke-logs"
            shutil.rmtree(kept_logs, ignore_errors=True)
            shutil.copytree(test.logs, kept_logs)
            print(f"the pods' logs are in {kept_logs}")
        test.cleanup()

    print()
    print(f"{'scenario':32} {'result':6} {'timing':>8} {'took':>7}  details")
    for name, result, headline, took, detail in results:
        timing = f"{headline:.1f}s" if headline is not None else "-"
        print(f"{name:32} {result:6} {timing:>8} {took:6.1f}s  {detail}")
    print(f"\ncontainer restarts by the emulated kubelet: {restarts or 'none'}")
    if unknown:
        print(f"note: this server binary does not know {', '.join(unknown)}; the manifests set them")
    passed = sum(r[1] == "pass" for r in results)
    print(f"the smoke test took {time.monotonic() - START:.0f}s")
    print(f"smoke: {passed} passed, {len(results) - passed} failed")
    return 1 if any(r[1] != "pass" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
