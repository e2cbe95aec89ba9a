"""A client on the swarm demo's overlay network (compose/demo swarm runs it in a throw-away container).

It reaches the balancer replicas the way a client inside the swarm does: by name, through Docker's DNS
(`tasks.sluicegate_sluicegate` lists every replica). Standard library only, so it runs in the backend
image.

  swarmclient.py ready REPLICAS BACKENDS  wait (at most 120 s) until REPLICAS replicas each see BACKENDS
                                          healthy backends
  swarmclient.py routes CLIENTS           JSON {replica: {"routes": {client: backend}, "served_by": ...}}
  swarmclient.py load RATE MAX_SECONDS    new connections at RATE per second by service name, until
                                          SIGTERM or MAX_SECONDS; prints a JSON report
"""
import json
import random
import signal
import socket
import sys
import threading
import time
import urllib.request

REPLICAS = "tasks.sluicegate_sluicegate"
SERVICE = "sluicegate_sluicegate"
PORT = 8080
ADMIN = 9901


def replica_ips():
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(REPLICAS, ADMIN, type=socket.SOCK_STREAM)})
    except socket.gaierror:
        return []


def get_json(ip, path):
    with urllib.request.urlopen(f"http://{ip}:{ADMIN}{path}", timeout=5) as r:
        return json.load(r)


def ready(replicas, backends):
    deadline = time.monotonic() + 120
    seen = "no replica resolves"
    while time.monotonic() < deadline:
        ips = replica_ips()
        healthy = {}
        for ip in ips:
            try:
                healthy[ip] = sum(1 for b in get_json(ip, "/backends")
                                  if b["health"] == "healthy" and b["state"] == "active")
            except (OSError, ValueError, KeyError):
                healthy[ip] = 0
        seen = f"replicas {len(ips)} healthy backends {sorted(healthy.values())}"
        if len(ips) >= replicas and all(n >= backends for n in healthy.values()):
            print(seen)
            return 0
        time.sleep(0.5)
    print("not ready after 120 s: " + seen, file=sys.stderr)
    return 1


def routes(clients):
    out = {}
    for ip in replica_ips():
        table, name = {}, ip
        for i in range(clients):
            c = f"10.{i // 50}.{i % 50 * 5}.7"
            r = get_json(ip, "/route?client=" + c)
            table[c] = r["backend"]
            name = r.get("instance") or ip
        with urllib.request.urlopen(f"http://{ip}:{PORT}/", timeout=5) as r:
            served = r.headers["X-Backend"]
        out[name] = {"routes": table, "served_by": served}
    print(json.dumps(out))
    return 0


def one_request(report, lock):
    """One request on a new connection, as a client does: resolve the name, try the addresses in turn."""
    try:
        addrs = [a[4] for a in socket.getaddrinfo(SERVICE, PORT, type=socket.SOCK_STREAM)]
    except socket.gaierror as e:
        with lock:
            report["failed"] += 1
            report["failures"].append(f"resolve: {e}")
        return
    random.shuffle(addrs)
    last = "no address"
    for addr in addrs:
        try:
            s = socket.create_connection(addr, timeout=5)
        except OSError as e:
            # A replica that no longer accepts: the next address is tried, and this is counted.
            with lock:
                report["refused_attempts"] += 1
            last = f"connect {addr[0]}: {e}"
            continue
        try:
            s.sendall(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            last = f"request via {addr[0]}: {e}"
            data = b""
        finally:
            s.close()
        if data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]:
            with lock:
                report["ok"] += 1
            return
        last = last if not data else f"via {addr[0]}: {data[:60]!r}"
        break
    with lock:
        report["failed"] += 1
        if len(report["failures"]) < 20:
            report["failures"].append(last)


def load(rate, max_seconds):
    report = {"requests": 0, "ok": 0, "failed": 0, "refused_attempts": 0, "failures": []}
    lock = threading.Lock()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    threads = []
    i = 0
    while not stop.is_set() and time.monotonic() - started < max_seconds:
        due = started + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            stop.wait(pause)
            continue
        t = threading.Thread(target=one_request, args=(report, lock))
        t.start()
        threads.append(t)
        threads = [t for t in threads if t.is_alive()]
        report["requests"] += 1
        i += 1
    for t in threads:
        t.join(timeout=10)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))
    return 0


def main(argv):
    if len(argv) == 3 and argv[0] == "ready":
        return ready(int(argv[1]), int(argv[2]))
    if len(argv) == 2 and argv[0] == "routes":
        return routes(int(argv[1]))
    if len(argv) == 3 and argv[0] == "load":
        return load(float(argv[1]), float(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
