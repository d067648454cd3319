"""Talking to the pods from the client namespace: a minimal Redis protocol
client, HTTP to the server's API, and reading the Redis set's state (roles,
what the sentinels say) from them."""

from __future__ import annotations

import http.client
import json
import secrets
import urllib.parse
from typing import TYPE_CHECKING

from plumbing import Failed, netns_socket

if TYPE_CHECKING:
    from pods import Pod

MASTER_NAME = "mymaster"


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


class Clients:
    """The test bed's requests to its pods. Mixed into Smoke (testbed.py),
    whose attributes it uses: client (the client namespace), pods, redis,
    sentinels, server, the passwords, user, token, and the acknowledged
    writes."""

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
