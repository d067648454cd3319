"""The scenarios the smoke test runs, in order, on one test bed: each
returns (headline time, details) or raises Failed. SCENARIOS lists them
with the names the table shows; --only picks them by their numbers there."""

from __future__ import annotations

import secrets
import signal
import threading
import time

from clients import MASTER_NAME
from plumbing import Failed, log
from pods import Pod, quantity, stop_all
from testbed import Smoke


# --------------------------------------------------------------------------
# Helpers


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


def started_within_budget(pod: Pod, since: float) -> float:
    """Polls the pod's startup probe (more often than the kubelet, to time
    it) and fails if it does not pass within the kubelet's budget."""
    budget = pod.startup_budget()
    wait_for(f"{pod.name}'s startupProbe", lambda: pod.probe("startupProbe"),
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


# --------------------------------------------------------------------------
# The scenarios


def scenario_first_boot(t: Smoke):
    began = time.monotonic()
    for pod in t.redis + t.sentinels + [t.server, t.offloader]:
        pod.start()
    details = []
    for pod in t.redis:
        details.append(f"{pod.name} started {started_within_budget(pod, began):.1f}s")
    _, state = wait_for("the set converging", t.converged, timeout=60)
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
    write_until_ok(t, "boot", timeout=30)
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
    started = started_within_budget(pod, began)
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
        started_within_budget(master, time.monotonic())
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
    _, state = wait_for("the set converging", t.converged, timeout=90)
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
    write_until_ok(t, "after-restart", timeout=30)
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
        started = started_within_budget(replica, began)
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
    started_within_budget(replica, began)
    wait_for(f"{replica.name} rejoining at its new address", t.converged, timeout=60)
    rejoined = time.monotonic() - began
    write_until_ok(t, "new-address", timeout=30)
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
