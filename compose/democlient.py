#!/usr/bin/env python3
"""The compose demo's client and checks, used by compose/demo and tests/e2e (standard library only).

Each command prints what it found and exits 1 when its guarantee does not hold (2 on a bad command
line). Where things are: SG_ADDR, the proxy (default 127.0.0.1:8080); SG_ADMIN, sluicegate's admin API
(default http://127.0.0.1:9901); SG_PROMETHEUS (default http://127.0.0.1:9090); SG_SERVICE, the
service whose backends the checks read (default web); SG_REDIS, sluicegate's Redis service (default
127.0.0.1:6380). Every loop is bounded
in count and time. `democlient.py COMMAND --help` describes each command.

Traffic through the proxy:
  spread N                   N sequential requests to GET /; prints who answered
  downloads K BYTES RATE     K parallel GET /bytes downloads paced at RATE bytes/s each; verifies every
                             byte against the backend's pattern
  refused                    succeeds when a new connection to the proxy is refused or reset
  redis-role                 "ROLE RUN_ID" of the Redis server sluicegate's Redis service reaches
  redis-set KEY VALUE        SET through sluicegate answers +OK (a replica would answer -READONLY)
sluicegate's admin API:
  status                     the backends, one line each
  healthy                    the number of healthy active backends (0 when the API does not answer)
  counts                     "HEALTHY_ACTIVE LISTED" (backends not removed)
  health-of ADDRESS          that backend's health, or "absent"
  backend-names              the names of the backends not removed, sorted, each followed by a space
  replica-count              the replicas sluicegate runs (0 when the API does not answer)
  engines                    the relay engine each service runs, one line each (from /metrics)
  replacement CONTAINER      "NEW replaces it: REASON" for each running replica that replaced CONTAINER
  wrk-report BACKENDS REQ_BEFORE REQ_AFTER
                             requests and connections per backend during a run
Prometheus:
  prometheus-up [--wait S]   succeeds when Prometheus reports its sluicegate target up
  prometheus-has-data QUERY  succeeds when QUERY's first result is above 0
Reports of what sluicegate-load, `downloads` and swarmclient.py wrote:
  load-report FILE [--label TEXT] [--no-failures]
  failover-check FILE KILLED every request due after KILLED (Unix seconds) was served
  drain-report FILE
  swarm-agree ROUTES [save FILE | compare FILE]
  rolling-update-report FILE
Inside a backend container (`docker exec -i C python3 - COMMAND < democlient.py`):
  backend-requests           the requests it has served (its /stats)
  backend-health ok|fail     makes its /health answer 200 or 503
On the Docker host:
  hardened NAME INSPECT [swarm]   the container is hardened (INSPECT: the fields compose/lib.sh reads)
  named-routes               reads sluicegate's JSON log on stdin; prints how many routing lines name
                             their backend

Load (many requests at a paced rate) is sluicegate-load's job, the load tool built with sluicegate.
"""

import argparse
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter

HOST, _PORT = os.environ.get("SG_ADDR", "127.0.0.1:8080").rsplit(":", 1)
PORT = int(_PORT)
ADMIN = os.environ.get("SG_ADMIN", "http://127.0.0.1:9901")
PROMETHEUS = os.environ.get("SG_PROMETHEUS", "http://127.0.0.1:9090")
# The backend's own address, inside its container.
BACKEND = "http://127.0.0.1:5000"
_PERIOD = bytes((i * 7 + 13) % 251 for i in range(251))
# What a JSON API that does not answer (urllib's errors are OSErrors), or answers something else, raises.
API_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError)
# The service the demo's checks are about: the plain HTTP one (the demo's TLS services share its
# backends, so /backends lists each backend once per service).
SERVICE = os.environ.get("SG_SERVICE", "web")


class Failed(Exception):
    """A check that does not hold: main prints the message and exits 1."""


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def load_json(path):
    with open(path) as f:
        return json.load(f)


# Traffic through the proxy.


def expected_digest(n):
    """SHA-256 of the first n bytes of the backend's /bytes pattern."""
    h = hashlib.sha256()
    block = _PERIOD * 1024
    full, rest = divmod(n, len(block))
    for _ in range(full):
        h.update(block)
    h.update(block[:rest])
    return h.hexdigest()


def get(path, timeout=10):
    c = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def spread(a):
    """N sequential requests to GET /; prints who answered; fails when one failed."""
    seen = Counter()
    failed = 0
    for _ in range(a.n):
        try:
            status, body = get("/")
            if status != 200:
                failed += 1
                continue
            seen[json.loads(body)["hostname"]] += 1
        except Exception:  # noqa: BLE001 - any failure of a request is what is counted
            failed += 1
    print(json.dumps({"requests": a.n, "failed": failed, "by_backend": dict(sorted(seen.items()))}))
    return failed == 0


def downloads(a):
    """K parallel paced downloads; prints each result; fails unless every byte of each is right."""
    k, n, rate = a.k, a.bytes, a.rate
    want = expected_digest(n)
    results = [None] * k

    def one(i):
        try:
            c = http.client.HTTPConnection(HOST, PORT, timeout=60)
            c.request("GET", f"/bytes?n={n}&rate={rate}", headers={"Connection": "close"})
            r = c.getresponse()
            h = hashlib.sha256()
            got = 0
            while True:
                chunk = r.read(65536)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            c.close()
            results[i] = {"status": r.status, "bytes": got, "ok": r.status == 200 and got == n
                          and h.hexdigest() == want, "backend": r.getheader("X-Backend")}
        except Exception as e:  # noqa: BLE001 - every failure is reported in the results
            results[i] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    good = sum(1 for r in results if r and r["ok"])
    print(json.dumps({"downloads": k, "complete_and_correct": good, "bytes_each": n,
                      "results": results}))
    return good == k


def refused(_a):
    """Succeeds when a new connection to the proxy is refused, reset or closed unanswered."""
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((HOST, PORT))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(100)
        ok = data == b""
        print(json.dumps({"refused": ok, "answered": data[:40].decode("latin-1")}))
        return ok
    except OSError as e:
        print(json.dumps({"refused": True, "error": type(e).__name__}))
        return True
    finally:
        s.close()


# sluicegate's admin API.


def of_service(backends):
    """The entries of GET /backends that belong to the demo's service."""
    return [b for b in backends if b.get("service", SERVICE) == SERVICE]


def backends():
    """GET /backends, the demo's service's entries."""
    return of_service(get_json(ADMIN + "/backends"))


def status_lines(backends):
    """One line per backend of GET /backends."""
    return ["  {address:<22} {health:<10} {state:<9} active={active:<4} total={total:<6} source={source} {dns}"
            .format(dns=b.get("dns_name") or "", **b) for b in backends]


def healthy_active(backends):
    return sum(1 for b in backends if b["health"] == "healthy" and b["state"] == "active")


def listed(backends):
    """The backends sluicegate still lists (a removed one stays in /backends for a while)."""
    return [b for b in backends if b["state"] != "removed"]


def status(_a):
    """The backends as sluicegate sees them, one line each."""
    for line in status_lines(backends()):
        print(line)
    return True


def healthy(_a):
    """The number of healthy active backends; 0 when the admin API does not answer."""
    try:
        n = healthy_active(backends())
    except API_ERRORS:
        n = 0
    print(n)
    return True


def counts(_a):
    """Prints "HEALTHY_ACTIVE LISTED" of the backends not removed."""
    b = listed(backends())
    print(healthy_active(b), len(b))
    return True


def health_of(a):
    """The health of the backend at ADDRESS, or "absent"."""
    print(next((b["health"] for b in backends() if b["address"] == a.address), "absent"))
    return True


def names_line(backends):
    return " ".join(sorted(b["name"] or "" for b in listed(backends))) + " "


def backend_names(_a):
    """The names of the backends not removed, sorted, each followed by a space (as a shell loop prints)."""
    print(names_line(backends()))
    return True


def replica_count(_a):
    """The replicas sluicegate runs (GET /rep); 0 when the admin API does not answer."""
    try:
        n = get_json(ADMIN + "/rep")["message"]["N"]
    except API_ERRORS:
        n = 0
    print(n)
    return True


def relay_engines(page):
    """{service: relay engine} from a /metrics page's sluicegate_relay_info samples."""
    found = {}
    for line in page.splitlines():
        if line.startswith("sluicegate_relay_info{"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line.split("}", 1)[0]))
            found[labels.get("service", "?")] = labels.get("relay", "?")
    return found


def engines(_a):
    """The relay engine each service runs, one line each: what sluicegate_relay_info on /metrics
    says, which is `epoll` where a service asked for `ring` or `auto` and io_uring is
    unavailable."""
    with urllib.request.urlopen(ADMIN + "/metrics", timeout=10) as r:
        found = relay_engines(r.read().decode())
    if not found:
        raise Failed("/metrics has no sluicegate_relay_info sample")
    for service, relay in sorted(found.items()):
        print(f"{service}: {relay}")
    return True


def replacements(backends, victim):
    """A line for each running replica that replaced the container `victim`."""
    out = []
    for b in backends:
        r = b.get("replica") or {}
        if (r.get("replaced") or {}).get("previous_container") == victim and r.get("docker_state") == "running":
            out.append(r["container"] + " replaces it: " + r["replaced"]["reason"])
    return out


def replacement(a):
    """Prints who replaced CONTAINER, if a running replica did (nothing yet: the caller asks again)."""
    try:
        listed_now = backends()
    except API_ERRORS:
        return True
    for line in replacements(listed_now, a.container):
        print(line)
    return True


def parse_requests(text):
    """{hostname: requests} from lines "HOSTNAME REQUESTS"."""
    return dict(line.split() for line in text.splitlines() if line.strip())


def wrk_table(backends_before, req_before, req_after, backends_after):
    """Requests per backend (their own counters) next to connections per backend (sluicegate's)."""
    before = {b["address"]: b["total"] for b in backends_before}
    req = {h: int(req_after[h]) - int(req_before.get(h, 0)) for h in req_after}
    conns = {b["address"]: b["total"] - before.get(b["address"], 0) for b in backends_after}
    rt, ct = sum(req.values()) or 1, sum(conns.values()) or 1
    out = ["  requests by backend (hostname)       connections by backend (address)"]
    rl, cl = sorted(req.items()), sorted(conns.items())
    for i in range(max(len(rl), len(cl))):
        r = f"{rl[i][0]:<14} {rl[i][1]:>8} {100 * rl[i][1] / rt:5.1f} %" if i < len(rl) else ""
        c = f"{cl[i][0]:<22} {cl[i][1]:>6} {100 * cl[i][1] / ct:5.1f} %" if i < len(cl) else ""
        out.append(f"  {r:<36} {c}")
    return out


def wrk_report(a):
    """The table of what each backend served during a run, from the /backends and request counts
    taken before it and the ones now."""
    after = backends()
    for line in wrk_table(of_service(json.loads(a.backends_before)), parse_requests(a.requests_before),
                          parse_requests(a.requests_after), after):
        print(line)
    return True


# Prometheus.


def sluicegate_target(targets):
    """(up, what was seen) from Prometheus's /api/v1/targets answer, for the job `sluicegate`."""
    ours = [t for t in targets["data"]["activeTargets"] if t["labels"]["job"] == "sluicegate"]
    if any(t["health"] == "up" for t in ours):
        return True, "target up"
    if not ours:
        return False, "Prometheus has no target of the job sluicegate"
    return False, "; ".join(f"target {t.get('scrapeUrl', '?')} is {t['health']}: "
                            f"{t.get('lastError') or 'not scraped yet'}" for t in ours)


def prometheus_up(a):
    """Succeeds when Prometheus reports its sluicegate target up, asking every 0.5 s for up to --wait
    seconds; says what it saw last when it fails."""
    start = time.monotonic()
    while True:
        try:
            up, seen = sluicegate_target(get_json(PROMETHEUS + "/api/v1/targets", timeout=5))
        except API_ERRORS as e:
            up, seen = False, f"Prometheus does not answer at {PROMETHEUS}: {e}"
        if up:
            print(f"Prometheus scrapes sluicegate (target up after {time.monotonic() - start:.1f} s)")
            return True
        if time.monotonic() - start >= a.wait:
            raise Failed(f"Prometheus does not scrape sluicegate{f' after {a.wait:g} s' if a.wait else ''}: {seen}")
        time.sleep(0.5)


def has_data(answer):
    """Whether a Prometheus query has a result above 0 (the demo's services without traffic, such as
    the TLS ones, have results of 0 beside it)."""
    return any(float(r["value"][1]) > 0 for r in answer["data"]["result"])


def prometheus_has_data(a):
    """Succeeds when the query has a result above 0."""
    url = PROMETHEUS + "/api/v1/query?" + urllib.parse.urlencode({"query": a.query})
    return has_data(get_json(url))


# Reports of saved JSON.


def load_summary(r):
    """sluicegate-load's JSON report as two lines: the counts, and who served."""
    return (json.dumps({k: r[k] for k in ("requests", "ok", "failed", "failures")}),
            "served by: " + ", ".join(f"{b} {v['requests']}" for b, v in sorted(r["backends"].items())))


def load_report(a):
    """Prints sluicegate-load's report (after --label); with --no-failures, fails if a request failed."""
    r = load_json(a.file)
    counts_line, served = load_summary(r)
    print(f"{a.label} {counts_line}" if a.label else counts_line)
    print(served)
    return r["failed"] == 0 or not a.no_failures


def failover_verdict(r, killed):
    """(ok, requests cut in flight): every request due after `killed` was served, and some were."""
    after = [t for t in r["failed_at"] if t > killed]
    return not after and r["ok"] > 0, r["failed"] - len(after)


def failover_check(a):
    """Succeeds when no request due after KILLED failed; reports the ones cut in flight before it."""
    ok, cut = failover_verdict(load_json(a.file), a.killed)
    if cut:
        print(f"{cut} request(s) in flight on the killed backend were cut (due before the kill returned)")
    return ok


def drain_report(a):
    """The counts of the `downloads` report."""
    d = load_json(a.file)
    print(json.dumps({k: d[k] for k in ("downloads", "complete_and_correct", "bytes_each")}))
    return True


def agreement(routes, before=None):
    """Whether the balancer replicas of swarmclient.py's `routes` agree: (ok, lines, first's routes).
    With `before` (an earlier first replica's routes), no client may have changed backend since."""
    names = sorted(routes)
    if len(names) < 2:
        raise Failed(f"only {len(names)} balancer replica answers")
    first = routes[names[0]]["routes"]
    differ = sum(1 for c, b in first.items() for n in names[1:] if routes[n]["routes"][c] != b)
    served = {n: routes[n]["served_by"] for n in names}
    lines, moved = [], 0
    if before is not None:
        moved = sum(1 for c, b in before.items() if first.get(c) != b)
        lines.append(f"clients whose backend changed since the first check: {moved} of {len(before)}")
    lines.append(f"replicas {', '.join(names)}: {differ} of {len(first)} client addresses routed differently; "
                 f"one client was served by {served}")
    return not differ and not moved and len(set(served.values())) == 1, lines, first


def swarm_agree(a):
    """The replicas route every client alike and serve one request by the same backend; `save FILE`
    keeps the routes, `compare FILE` also checks that no client's backend changed since."""
    if a.mode and not a.path:
        raise Failed(f"swarm-agree {a.mode} needs a FILE")
    ok, lines, first = agreement(json.loads(a.routes), load_json(a.path) if a.mode == "compare" else None)
    for line in lines:
        print(line)
    if a.mode == "save":
        with open(a.path, "w") as f:
            json.dump(first, f)
    return ok


def rolling_update_report(a):
    """swarmclient.py's load report: no connection failed and some succeeded."""
    r = load_json(a.file)
    print("load during the update:", json.dumps(r))
    return r["failed"] == 0 and r["ok"] > 0


# Inside a backend container.


def backend_requests(_a):
    """The requests this backend has served (its /stats)."""
    print(get_json(BACKEND + "/stats")["requests"])
    return True


def backend_health(a):
    """Makes this backend's /health answer 200 (ok) or 503 (fail)."""
    req = urllib.request.Request(f"{BACKEND}/health/{a.state}", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        return True


# On the Docker host.


def hardening(name, inspect, proc_status, swarm):
    """(problems, summary) of a container: `inspect` is docker inspect's SecurityOpt, CapDrop and
    CapAdd (JSON), Memory, NanoCpus and PidsLimit; `proc_status` its main process's /proc status.
    Swarm services cannot set no-new-privileges, so `swarm` does not ask for it."""
    sec, drop, add, mem, cpus, pids = inspect
    status = dict(line.split(":", 1) for line in proc_status.splitlines() if ":" in line)
    nnp = not swarm
    problems = []
    if nnp and not ("no-new-privileges" in sec and "false" not in sec):
        problems.append("no-new-privileges")
    if drop != '["ALL"]':
        problems.append("cap_drop ALL")
    if add not in ("null", "[]"):
        problems.append("no capability added back")
    if not (int(mem) > 0 and int(cpus) > 0 and int(pids) > 0):
        problems.append("memory, CPU and pids limits")
    # What the kernel enforces on the main process.
    if nnp and status["NoNewPrivs"].strip() != "1":
        problems.append("NoNewPrivs in /proc")
    if int(status["CapEff"].strip(), 16) != 0 or int(status["CapBnd"].strip(), 16) != 0:
        problems.append("no capability in /proc")
    summary = (f"{name}: {'no-new-privileges, ' if nnp else ''}no capability, memory {int(mem) >> 20} MiB, "
               f"{int(cpus) / 1e9:g} CPUs, {pids} pids")
    return problems, summary


def hardened(a):
    """The container is hardened: no-new-privileges (unless swarm), every capability dropped and none
    added, memory, CPU and pids limits, and its main process really runs so."""
    fields = a.inspect.split(" ")
    if len(fields) != 7:
        raise Failed(f"{a.name}: expected 7 inspect fields, got {a.inspect!r}")
    pid = fields[6]
    with open(f"/proc/{pid}/status") as f:
        problems, summary = hardening(a.name, fields[:6], f.read(), a.mode == "swarm")
    if problems:
        raise Failed(f"{a.name} is missing: {', '.join(problems)}")
    print(summary)
    return True


def count_named_routes(lines):
    """Routing-log lines (JSON, target sluicegate::route) that name their backend."""
    n = 0
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("target") == "sluicegate::route" and entry.get("backend_name"):
            n += 1
    return n


def named_routes(_a):
    """Reads sluicegate's log on stdin; prints how many routing lines name their backend."""
    print(count_named_routes(sys.stdin))
    return True


REDIS = os.environ.get("SG_REDIS", "127.0.0.1:6380")


def redis_exchange(commands, timeout=5):
    """Sends RESP inline commands to sluicegate's Redis service, then QUIT; returns all it answered."""
    host, port = REDIS.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall("".join(c + "\r\n" for c in [*commands, "QUIT"]).encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks).decode(errors="replace")


def info_fields(text):
    """The `key:value` lines of INFO answers."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def redis_role(_a):
    """Through sluicegate: the role and run_id of the Redis server that answers ("ROLE RUN_ID")."""
    f = info_fields(redis_exchange(["INFO server", "INFO replication"]))
    if "role" not in f or "run_id" not in f:
        raise Failed("no INFO answer through sluicegate's Redis service")
    print(f["role"], f["run_id"])
    return True


def redis_set(a):
    """Through sluicegate: SET KEY VALUE must answer +OK (a replica would say -READONLY)."""
    answer = redis_exchange([f"SET {a.key} {a.value}"])
    if not answer.startswith("+OK"):
        raise Failed(f"SET {a.key} answered {answer.strip()!r}")
    print(f"SET {a.key}: OK")
    return True


def parser():
    # The description: the docstring up to its list of commands (argparse lists them).
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name, fn):
        c = sub.add_parser(name, help=fn.__doc__.split("\n")[0], description=fn.__doc__)
        c.set_defaults(run=fn)
        return c

    cmd("spread", spread).add_argument("n", type=int)
    c = cmd("downloads", downloads)
    c.add_argument("k", type=int)
    c.add_argument("bytes", type=int)
    c.add_argument("rate", type=int)
    cmd("refused", refused)
    cmd("status", status)
    cmd("healthy", healthy)
    cmd("counts", counts)
    cmd("health-of", health_of).add_argument("address")
    cmd("backend-names", backend_names)
    cmd("replica-count", replica_count)
    cmd("engines", engines)
    cmd("replacement", replacement).add_argument("container")
    c = cmd("wrk-report", wrk_report)
    c.add_argument("backends_before", help="GET /backends before the run (JSON)")
    c.add_argument("requests_before", help='lines "HOSTNAME REQUESTS" before the run')
    c.add_argument("requests_after", help='lines "HOSTNAME REQUESTS" after the run')
    cmd("prometheus-up", prometheus_up).add_argument("--wait", type=float, default=0.0, metavar="SECONDS")
    cmd("prometheus-has-data", prometheus_has_data).add_argument("query")
    c = cmd("load-report", load_report)
    c.add_argument("file")
    c.add_argument("--label", default="")
    c.add_argument("--no-failures", action="store_true")
    c = cmd("failover-check", failover_check)
    c.add_argument("file")
    c.add_argument("killed", type=float)
    cmd("drain-report", drain_report).add_argument("file")
    c = cmd("swarm-agree", swarm_agree)
    c.add_argument("routes", help="swarmclient.py routes' output (JSON)")
    c.add_argument("mode", nargs="?", choices=["save", "compare"])
    c.add_argument("path", nargs="?")
    cmd("rolling-update-report", rolling_update_report).add_argument("file")
    cmd("backend-requests", backend_requests)
    cmd("backend-health", backend_health).add_argument("state", choices=["ok", "fail"])
    c = cmd("hardened", hardened)
    c.add_argument("name")
    c.add_argument("inspect")
    c.add_argument("mode", nargs="?", choices=["", "swarm"], default="")
    cmd("named-routes", named_routes)
    cmd("redis-role", redis_role)
    c = cmd("redis-set", redis_set)
    c.add_argument("key")
    c.add_argument("value")
    return p


def main(argv):
    a = parser().parse_args(argv)
    try:
        return 0 if a.run(a) else 1
    except Failed as e:
        print(f"{a.command}: {e}", file=sys.stderr)
    except API_ERRORS as e:
        print(f"{a.command}: {type(e).__name__}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
