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

It then runs the scenarios (scenarios.py) and prints a table of results and
timings. deploy/README.md ("The smoke test") describes what it covers and
what it does not.

This file parses the command line, checks the machine and prints the
table; the rest lives in the modules next to it:
  plumbing.py   constants, the clock and log, errors, host commands,
                killing processes, sockets inside a namespace
  pods.py       the rendered manifests, and a pod's volumes, user,
                environment, command, probes and lifecycle
  clients.py    Redis and HTTP requests to the pods; the Redis set's state
  testbed.py    namespaces, hosts file, the pods built, the fake Loki, the
                kubelet's restarts, cleanup
  scenarios.py  the scenarios (SCENARIOS)

Usage (as root): deploy/smoke/run.sh path/to/server [--keep] [--only 2,3]
Without the privileges to create namespaces it prints "skipped: ..." and
exits 0. Every process and namespace it creates is removed on exit,
also on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

# The modules next to this file, whatever the current directory (and also
# under python -P, which leaves the script's directory off sys.path); no
# __pycache__ in the source tree, as this script alone never left one.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True

from plumbing import PREFIX, REPO, START, TOOLS, Failed, Skip, log, remove_stale_namespaces, run  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402
from testbed import Smoke  # noqa: E402

# The tools the pods' scripts and this test need; busybox is optional.
REQUIRED_TOOLS = ("ip", "unshare", "nsenter", "setpriv", "mount", "redis-server", "redis-cli", "timeout")


def preflight() -> None:
    """Raises Skip when this machine cannot create the namespaces."""
    if os.geteuid() != 0:
        raise Skip("not root: creating network and mount namespaces needs root")
    for tool in REQUIRED_TOOLS + ("busybox",):
        path = shutil.which(tool)
        if path:
            TOOLS[tool] = path
    missing = [tool for tool in REQUIRED_TOOLS if tool not in TOOLS]
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
        restarts = {p.name: p.restarts for p in test.pods.values() if p.restarts}
        if failed:
            for pod in test.pods.values():
                if pod.logfile.exists():
                    tail = pod.logfile.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- last lines of {pod.name}'s log (restarts: {pod.restarts})")
                    print("\n".join(tail))
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
