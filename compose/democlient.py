#!/usr/bin/env python3
"""Clients for the compose demo (standard library only).

  democlient.py spread N               N sequential requests to GET /; prints who answered
  democlient.py downloads K BYTES RATE K parallel GET /bytes downloads paced at RATE bytes/s each;
                                       verifies every byte against the backend's pattern; prints results
  democlient.py refused                succeeds when a new connection to the proxy is refused or reset

Load (many requests at a paced rate) is sluicegate-load's job, the load tool built with sluicegate.
Every command prints one JSON line and exits 1 when its guarantee does not hold. The target is
SG_ADDR (default 127.0.0.1:8080). Every loop is bounded in count and time.
"""
import hashlib
import http.client
import json
import os
import socket
import sys
import threading
import time
from collections import Counter

HOST, PORT = os.environ.get("SG_ADDR", "127.0.0.1:8080").rsplit(":", 1)
PORT = int(PORT)
_PERIOD = bytes((i * 7 + 13) % 251 for i in range(251))


def expected_digest(n):
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


def spread(n):
    n = int(n)
    seen = Counter()
    failed = 0
    for _ in range(n):
        try:
            status, body = get("/")
            if status != 200:
                failed += 1
                continue
            seen[json.loads(body)["hostname"]] += 1
        except Exception:
            failed += 1
    print(json.dumps({"requests": n, "failed": failed, "by_backend": dict(sorted(seen.items()))}))
    return failed == 0


def downloads(k, n, rate):
    k, n, rate = int(k), int(n), int(rate)
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
        except Exception as e:
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


def refused():
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


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"spread": spread, "downloads": downloads, "refused": refused}[cmd]
    sys.exit(0 if fn(*args) else 1)
