"""The manifests, rendered, and the pods made from them: each pod's
volumes, user, environment and command as the kubelet would derive them
from its spec, and its container's lifecycle (start, kill, stop with the
preStop hook, exec, probes) as local processes in its namespaces."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing import PREFIX, REPO, START, TOOLS, Failed, kill_group, log

try:
    import yaml
except ImportError:  # run.sh installs it; say so rather than a traceback
    sys.exit("smoke.py needs PyYAML: run it through deploy/smoke/run.sh")

if TYPE_CHECKING:
    from testbed import Smoke

OVERLAY = REPO / "deploy/k8s/overlays/dev"
BASE = REPO / "deploy/k8s/base"
# The image's entry point stands for the binary under test.
PROJECT_IMAGE = "tenant-kv-server"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The kubelet's restart back-off: 10 s, doubling, capped (here at 40 s,
# far beyond any scenario's budget).
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 40.0


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
# Pods


class Pod:
    """One pod: its namespaces, volumes, environment and main process."""

    def __init__(self, test: Smoke, name: str, pod_spec: dict, claims: list[str],
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
        # The group that owns the pod's volumes, as the kubelet sets it.
        self.volume_gid = self.fs_group if self.fs_group is not None else self.gid
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
                os.chown(source, self.uid, self.volume_gid)
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

    def argv(self, env: dict) -> list[str]:
        image = self.container["image"].split("@")[0].rsplit(":", 1)[0]
        command = self.container.get("command")
        args = self.container.get("args", [])
        if command is None:
            if image != PROJECT_IMAGE:
                raise Failed(f"{self.name}: no command, and the entry point of {image} is unknown here")
            command = [str(self.test.server_bin)]
        return [expand(a, env) for a in command + args]

    def start(self) -> None:
        with self.lock:
            if self.alive():
                raise Failed(f"{self.name} is already running")
            env = self.env()
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
                    os.chown(source, self.uid, self.volume_gid)
                self.test.mount_point(target, directory=source.is_dir())
                lines.append(f"{mount} --bind {shlex.quote(str(source))} {shlex.quote(target)}")
                if read_only:
                    lines.append(f"{mount} -o remount,bind,ro {shlex.quote(target)}")
            lines.append(f"{mount} --bind {shlex.quote(str(self.test.hosts))} /etc/hosts")
            if self.read_only_root:
                lines.append(f"{mount} -o remount,bind,ro /")
            lines.append("cd /")
            lines.append("exec " + " ".join(shlex.quote(a) for a in self.setpriv() + self.argv(env)))
            argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                    "--", "sh", "-c", "\n".join(lines)]
            with open(self.logfile, "a") as out:
                out.write(f"===== {self.name} started at {time.monotonic() - START:.1f}s\n")
                out.flush()
                self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
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
