"""What every part of the smoke test shares: the run's constants and clock,
its two exceptions, running host commands, killing process groups, and
sockets inside the network namespaces it creates."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Private addresses used only inside the namespaces this test creates.
SUBNET = "10.213.0"
CLIENT_IP = f"{SUBNET}.2"
LOKI_IP = f"{SUBNET}.3"
# Every namespace's name starts with this and the owner's process id, so
# that a later run can tell a dead run's namespaces from a live one's.
NAME_STEM = "tkvsmoke"
PREFIX = f"{NAME_STEM}{os.getpid()}"
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


def run(*argv: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout, **kwargs)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_netns_pids(netns: str) -> None:
    """SIGKILL to whatever runs in the network namespace, also processes in
    process groups of their own (a hook's or a script's children, like
    timeout's), which killing the pods' groups misses."""
    for pid in run("ip", "netns", "pids", netns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


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
        match = re.match(rf"{NAME_STEM}(\d+)-", name)
        if match and not running(int(match.group(1))):
            kill_netns_pids(name)
            run("ip", "netns", "del", name, check=False)


libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


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
                print(f"cannot return to the host's network namespace: errno {ctypes.get_errno()}",
                      file=sys.stderr, flush=True)
                os._exit(1)
    finally:
        os.close(home)
        os.close(target)
