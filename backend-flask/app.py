"""A small backend for the sluicegate demo: it says who it is and lets a demo steer its health.

GET  /             {"hostname": ..., "requests": N} (N counts this process's requests)
GET  /home         Hello from Server: <hostname>   (the seed systems' route; counted like /)
GET  /heartbeat    200 while the process runs (not counted)
GET  /stats        {"hostname": ..., "requests": N} without counting itself, for demos that compare
                   the requests each backend served
GET  /health       200 {"healthy": true}, or 503 after POST /health/fail until POST /health/ok
POST /health/fail  make /health answer 503
POST /health/ok    make /health answer 200 again
GET  /slow?s=N     answer after N seconds (at most 600)
GET  /bytes?n=N    N deterministic bytes, streamed (byte i is (i * 7 + 13) % 251), for bulk and
                   drain demos; the checksum of a download can be recomputed by the client
"""
import itertools
import os
import socket
import threading
import time

from flask import Flask, Response, jsonify, request

app = Flask(__name__)
HOSTNAME = socket.gethostname()
_lock = threading.Lock()
_requests = itertools.count(1)
_healthy = threading.Event()
_healthy.set()
CHUNK = 64 * 1024
# One period of the pattern (251 is prime, so the pattern repeats every 251 bytes); a chunk of whole
# periods lets every chunk be a slice of the same bytes.
_PERIOD = bytes((i * 7 + 13) % 251 for i in range(251))
_BLOCK = _PERIOD * (CHUNK // 251 + 2)


def pattern(offset, n):
    """n bytes of the pattern starting at byte `offset`."""
    start = offset % 251
    return _BLOCK[start:start + n]


# Every answer says who served it, for load tools that count per backend.
@app.after_request
def name_the_backend(response):
    response.headers["X-Backend"] = HOSTNAME
    return response


_served = 0


def count():
    global _served
    with _lock:
        _served = next(_requests)
        return _served


@app.get("/")
def index():
    return jsonify(hostname=HOSTNAME, requests=count(), pid=os.getpid())


@app.get("/home")
def home():
    count()
    return f"Hello from Server: {HOSTNAME}"


@app.get("/heartbeat")
def heartbeat():
    return jsonify(alive=True, hostname=HOSTNAME)


@app.get("/stats")
def stats():
    with _lock:
        served = _served
    return jsonify(hostname=HOSTNAME, requests=served)


@app.get("/health")
def health():
    if _healthy.is_set():
        return jsonify(healthy=True)
    return jsonify(healthy=False), 503


@app.post("/health/fail")
def health_fail():
    _healthy.clear()
    return jsonify(healthy=False, hostname=HOSTNAME)


@app.post("/health/ok")
def health_ok():
    _healthy.set()
    return jsonify(healthy=True, hostname=HOSTNAME)


@app.get("/slow")
def slow():
    s = min(max(request.args.get("s", default=1.0, type=float), 0.0), 600.0)
    time.sleep(s)
    return jsonify(hostname=HOSTNAME, slept=s)


@app.get("/bytes")
def data():
    n = max(request.args.get("n", default=1024, type=int), 0)
    # Pace the stream when asked (bytes per second), so a download can outlast a drain demo's signal.
    rate = request.args.get("rate", default=0, type=int)

    def generate():
        sent = 0
        started = time.monotonic()
        while sent < n:
            k = min(CHUNK, n - sent)
            yield pattern(sent, k)
            sent += k
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    headers = {"Content-Length": str(n), "X-Backend": HOSTNAME}
    return Response(generate(), mimetype="application/octet-stream", headers=headers)
