"""The test bed: its run directory, the network namespaces and the bridge
joining them, the hosts file standing in for cluster DNS, the pods built
from the rendered manifests, the stand-in for Loki, the emulated kubelet's
restarts, and the cleanup that removes all of it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clients import Clients
from plumbing import (CLIENT_IP, LOKI_IP, PREFIX, SUBNET, TOOLS, Failed, kill_group, kill_netns_pids,
                      log, run)
from pods import BACKOFF_MAX, Pod, find, render

CLUSTER_DOMAIN = "cluster.local"


class Smoke(Clients):
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
        self.add_netns(self.client, CLIENT_IP)
        self.add_netns(self.loki_ns, LOKI_IP)

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
        lines.append(f"{LOKI_IP} loki.{ns}.svc.{CLUSTER_DOMAIN} loki.{ns}.svc loki.{ns} loki")
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
        for ns in self.namespaces:
            kill_netns_pids(ns)
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
