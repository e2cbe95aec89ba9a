#!/usr/bin/env python3
"""Load-distribution report: how each balancing policy spreads connections over weighted backends.

Usage (from the repository root):
    python3 benchmarks/distribution.py [--requests 4000] [--clients 16] [--out benchmarks/results]

Starts four backends on 127.0.0.2-5 (one port, as Docker replicas) with weights 1:2:3:4, then for
every policy runs sluicegate (target/release/sluicegate, built if missing) in front of them and sends
REQUESTS connections from CLIENTS concurrent clients. Each client thread cycles through 64 loopback
source addresses (127.0.K.x), so source_hash sees about a thousand distinct clients. Each backend names
itself and closes; the counts come from what the clients were told, checked against sluicegate's own
/backends totals.

Then it measures what moves when a backend joins or leaves: sluicegate with source_hash over four equal
backends, each of 1024 client addresses asked once, a fifth backend added through the admin API and
every client asked again, then it and one of the first four removed. Next to it, the same changes on a
512-slot ring with 9 virtual nodes per server, as the L7 balancers this project grew from map request
ids (slots i + 2i² + 17 for request i, i + j + 2j² + 25 for virtual node j of server i, mod 512, with
linear probing), simulated here.

Writes distribution.md, distribution.json and distribution.svg (a bar chart of each backend's share
against its weight's share) to --out. Everything stays on loopback and every loop is bounded.
Jain's fairness index is computed on count/weight per backend: 1.0 when every backend got exactly its
weighted share (round_robin is judged against equal shares, since it ignores weights).
"""
import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ["round_robin", "weighted_round_robin", "least_conn", "p2c", "source_hash"]
WEIGHTS = [1, 2, 3, 4]
BACKEND_IPS = [f"127.0.0.{i}" for i in range(2, 2 + len(WEIGHTS))]
# The backend the join/leave measurement adds.
EXTRA_IP = "127.0.0.6"


def free_port(ips):
    """A port free on every address in `ips`."""
    for _ in range(100):
        s = socket.socket()
        s.bind((ips[0], 0))
        port = s.getsockname()[1]
        s.close()
        ok = True
        for ip in ips:
            t = socket.socket()
            try:
                t.bind((ip, port))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return port
    raise SystemExit("no free port")


class Backends:
    """One thread per backend: accept, write its name, close."""

    def __init__(self, port):
        self.socks = []
        self.stop = False
        for ip in [*BACKEND_IPS, EXTRA_IP]:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            s.listen(4096)
            s.settimeout(0.2)
            self.socks.append(s)
            threading.Thread(target=self.serve, args=(s, ip), daemon=True).start()

    def serve(self, s, ip):
        while not self.stop:
            try:
                c, _ = s.accept()
            except OSError:  # the accept timeout (socket.timeout is an OSError), or closed
                continue
            with contextlib.suppress(OSError):
                c.sendall(ip.encode() + b"\n")
            c.close()

    def close(self):
        self.stop = True
        for s in self.socks:
            s.close()


def run_policy(binary, policy, port, requests, clients):
    proc, listen_port, admin_port, cfg = start_sluicegate(binary, policy, port, WEIGHTS)
    try:
        counts = dict.fromkeys(BACKEND_IPS, 0)
        failed = 0
        lock = threading.Lock()
        per_client = requests // clients

        def client(k):
            nonlocal failed
            for j in range(per_client):
                # 64 source addresses per client thread: source_hash sees ~1000 distinct clients.
                src = f"127.0.{1 + k}.{2 + j % 64}"
                s = socket.socket()
                s.settimeout(10)
                try:
                    s.bind((src, 0))
                    s.connect(("127.0.0.1", listen_port))
                    who = s.makefile().readline().strip()
                    with lock:
                        counts[who] += 1
                except (OSError, KeyError):
                    with lock:
                        failed += 1
                finally:
                    s.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        elapsed = time.time() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/backends", timeout=5) as r:
            admin = {b["address"].split(":")[0]: b["total"] for b in json.load(r)}
        return counts, failed, elapsed, admin
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.unlink(cfg)


def start_sluicegate(binary, policy, port, weights):
    """sluicegate in front of BACKEND_IPS with `weights`: (process, listen port, admin port, config)."""
    listen_port = free_port(["127.0.0.1"])
    admin_port = free_port(["127.0.0.1"])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
        cfg.write(
            f"log: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:{admin_port}\"}}\n"
            f"shutdown: {{drain_timeout: 2s}}\nservices:\n  - name: dist\n"
            f"    listen: 127.0.0.1:{listen_port}\n    balance: {policy}\n    backends:\n"
        )
        for ip, w in zip(BACKEND_IPS, weights, strict=True):
            cfg.write(f"      - {{address: \"{ip}:{port}\", weight: {w}}}\n")
    proc = subprocess.Popen([binary, "--config", cfg.name], stdout=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{policy}: sluicegate exited with {proc.returncode} (its error is above)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, listen_port, admin_port, cfg.name
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit(f"{policy}: sluicegate did not become ready")


def admin_call(admin_port, method, path, body=None):
    # The admin API refuses a POST that is not JSON (415), body or not.
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def clients_map(listen_port, clients):
    """Which backend each client address lands on (one connection each)."""
    out = {}
    for k in range(clients // 64):
        for j in range(64):
            src = f"127.0.{1 + k}.{2 + j}"
            s = socket.socket()
            s.settimeout(10)
            try:
                s.bind((src, 0))
                s.connect(("127.0.0.1", listen_port))
                out[src] = s.makefile().readline().strip()
            except OSError:
                out[src] = None
            finally:
                s.close()
    return out


def moved(before, after):
    return sum(1 for c in before if before[c] != after.get(c)) / max(len(before), 1)


def seed_ring(servers, m=512, k=9):
    """The L7 seed systems' ring: virtual node j of server i at slot i + j + 2j² + 25 (mod m), linear
    probing on collisions; a request goes clockwise to the next virtual node."""
    slots = [None] * m
    for i in servers:
        for j in range(k):
            s = (i + j + 2 * j * j + 25) % m
            while slots[s] is not None:
                s = (s + 1) % m
            slots[s] = i
    return slots


def ring_lookup(slots, rid):
    m = len(slots)
    s = (rid + 2 * rid * rid + 17) % m
    while slots[s] is None:
        s = (s + 1) % m
    return slots[s]


def ring_moves(requests=100_000):
    """Share of request ids that change server on the same joins and leaves."""
    def mapping(servers):
        slots = seed_ring(servers)
        return {r: ring_lookup(slots, r) for r in range(requests)}
    four, five, three = mapping([1, 2, 3, 4]), mapping([1, 2, 3, 4, 5]), mapping([2, 3, 4])
    share = lambda m: {s: sum(1 for v in m.values() if v == s) / requests for s in sorted(set(m.values()))}  # noqa: E731
    return {"add 4 → 5": moved(four, five), "remove the 5th: 5 → 4": moved(five, four),
            "remove server 1: 4 → 3": moved(four, three), "shares with 4 servers": share(four)}


def measure_moves(binary, port, clients):
    """sluicegate's source_hash: the clients that move on each join and leave through the admin API."""
    proc, listen_port, admin_port, cfg = start_sluicegate(binary, "source_hash", port, [1] * len(BACKEND_IPS))
    try:
        four = clients_map(listen_port, clients)
        admin_call(admin_port, "POST", "/backends", {"service": "dist", "address": f"{EXTRA_IP}:{port}"})
        five = clients_map(listen_port, clients)
        admin_call(admin_port, "DELETE", f"/backends/dist/{EXTRA_IP}:{port}?mode=close")
        back = clients_map(listen_port, clients)
        admin_call(admin_port, "DELETE", f"/backends/dist/{BACKEND_IPS[0]}:{port}?mode=close")
        three = clients_map(listen_port, clients)
        failed = sum(1 for m in (four, five, back, three) for v in m.values() if v is None)
        return {"add 4 → 5": moved(four, five), "remove the 5th: 5 → 4": moved(five, back),
                "back where they were after add and remove": moved(four, back) == 0,
                "remove one of 4: 4 → 3": moved(back, three),
                # Maglev's table is near-minimal: a few clients of the other backends move too.
                "others moved": sum(1 for c in back if back[c] != BACKEND_IPS[0] and three[c] != back[c])
                / max(len(back), 1),
                "joined got": sum(1 for v in five.values() if v == EXTRA_IP) / max(len(five), 1),
                "clients": len(four), "failed": failed}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.unlink(cfg)


def jain(counts, weights):
    x = [c / w for c, w in zip(counts, weights, strict=True)]
    s, q = sum(x), sum(v * v for v in x)
    return s * s / (len(x) * q) if q else None


def svg_chart(rows):
    """Grouped bars: for each policy, each backend's share; a tick marks the weighted share."""
    colors = ["#58a6ff", "#3fb950", "#d29922", "#f778ba"]
    width, height, left, bottom, top = 900, 360, 50, 300, 30
    group = (width - left - 20) / len(rows)
    bar = group / (len(WEIGHTS) + 1.5)
    maxshare = max(max(r["shares"]) for r in [*rows, {"shares": [w / sum(WEIGHTS) for w in WEIGHTS]}])
    maxshare = min(1.0, maxshare * 1.15)
    y = lambda v: bottom - (bottom - top) * v / maxshare  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">Share of connections per backend (weights 1:2:3:4); '
           f'tick = expected share; J = Jain\'s index</text>']
    for i in range(5):
        v = maxshare * i / 4
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v * 100:.0f}%</text>')
    for g, r in enumerate(rows):
        x0 = left + g * group + bar * 0.75
        for i, share in enumerate(r["shares"]):
            x = x0 + i * bar
            out.append(f'<rect x="{x:.1f}" y="{y(share):.1f}" width="{bar * 0.85:.1f}" '
                       f'height="{bottom - y(share):.1f}" fill="{colors[i]}"/>')
            e = r["expected"][i]
            out.append(f'<line x1="{x - 2:.1f}" x2="{x + bar * 0.85 + 2:.1f}" y1="{y(e):.1f}" '
                       f'y2="{y(e):.1f}" stroke="black" stroke-width="2"/>')
        cx = left + g * group + group / 2
        out.append(f'<text x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle">{r["policy"]}</text>')
        j = "–" if r["jain"] is None else f'{r["jain"]:.3f}'
        out.append(f'<text x="{cx:.1f}" y="{bottom + 30}" text-anchor="middle" fill="#555">J = {j}</text>')
    for i, (ip, w) in enumerate(zip(BACKEND_IPS, WEIGHTS, strict=True)):
        out.append(f'<rect x="{left + i * 150}" y="{height - 14}" width="10" height="10" fill="{colors[i]}"/>')
        out.append(f'<text x="{left + i * 150 + 14}" y="{height - 5}">{ip} (weight {w})</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "sluicegate"))
    a = ap.parse_args()
    a.requests = max(a.clients, min(a.requests, 200_000))
    if not os.path.exists(a.bin):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    port = free_port(BACKEND_IPS)
    backends = Backends(port)
    rows = []
    try:
        for policy in POLICIES:
            counts, failed, elapsed, admin = run_policy(a.bin, policy, port, a.requests, a.clients)
            n = [counts[ip] for ip in BACKEND_IPS]
            total = sum(n) or 1
            weights = [1] * len(WEIGHTS) if policy == "round_robin" else WEIGHTS
            expected = [w / sum(weights) for w in weights]
            rows.append({
                "policy": policy, "counts": n, "failed": failed, "seconds": round(elapsed, 2),
                "shares": [c / total for c in n], "expected": expected, "jain": jain(n, weights),
                "admin_totals": [admin.get(ip, 0) for ip in BACKEND_IPS],
                "max_deviation_pp": max(abs(c / total - e) for c, e in zip(n, expected, strict=True)) * 100,
            })
            print(f"{policy:<22} {n} failed={failed} J={rows[-1]['jain']:.4f}", file=sys.stderr)
        moves = measure_moves(a.bin, port, a.clients * 64)
        print(f"source_hash moves: {moves}", file=sys.stderr)
    finally:
        backends.close()
    ring = ring_moves()
    os.makedirs(a.out, exist_ok=True)
    meta = {"requests_per_policy": a.requests, "clients": a.clients, "weights": WEIGHTS,
            "backends": BACKEND_IPS, "date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine,
            "cpus": os.cpu_count()}
    with open(os.path.join(a.out, "distribution.json"), "w") as f:
        json.dump({"meta": meta, "policies": rows, "moves": moves, "seed_ring_moves": ring}, f, indent=1)
    with open(os.path.join(a.out, "distribution.svg"), "w") as f:
        f.write(svg_chart(rows))
    md = ["# Load distribution by policy", "",
          f"{a.requests} connections per policy from {a.clients} concurrent clients (from "
          f"{a.clients * 64} distinct 127.0.K.x source addresses) to four backends weighted 1:2:3:4, {meta['date']}, "
          f"{meta['cpus']} CPUs. Command: `python3 benchmarks/distribution.py`.", "",
          "Expected shares are the weights' (equal shares for round_robin, which ignores weights). "
          "Jain's index is computed on connections ÷ weight: 1.0 is a perfect weighted split.", "",
          "![shares per backend](distribution.svg)", "",
          "| policy | 127.0.0.2 (w1) | 127.0.0.3 (w2) | 127.0.0.4 (w3) | 127.0.0.5 (w4) | max deviation | Jain "
          "| failed |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [f"{c} ({s * 100:.1f} % / {e * 100:.1f} %)" for c, s, e in
                 zip(r["counts"], r["shares"], r["expected"], strict=True)]
        md.append(f"| {r['policy']} | " + " | ".join(cells) +
                  f" | {r['max_deviation_pp']:.2f} pp | {r['jain']:.4f} | {r['failed']} |")
    md += ["", "Cells: connections (share / expected share). The counts are what the clients were told by "
           "the backends; sluicegate's own `/backends` totals agree (`admin_totals` in the JSON).",
           "", "Notes: least_conn and p2c balance open connections; with short connections most picks "
           "are ties, broken in weighted order (least_conn) or by weighted draws (p2c), so they follow "
           "the weights; under concurrency least_conn evens out *open* connections per weight, which "
           "sends more than its weight's share to a light backend whenever it is idle. source_hash "
           "maps each client address to one backend on a weighted Maglev table: its split follows the "
           "weights as far as the client addresses hash evenly, and a client always lands on the same "
           "backend.",
           "", "## What moves when a backend joins or leaves", "",
           f"sluicegate, `source_hash` over four equal backends, {moves['clients']} client addresses each "
           "asked once before and after each change made through the admin API "
           f"({moves['failed']} failed):", "",
           "| change | clients that moved | ideal |", "| --- | --- | --- |",
           f"| add a 5th backend (`POST /backends`) | {moves['add 4 → 5'] * 100:.1f} % "
           f"(the new one got {moves['joined got'] * 100:.1f} %) | 20 % (1/5) |",
           f"| remove it again (`DELETE /backends/…`) | {moves['remove the 5th: 5 → 4'] * 100:.1f} % "
           f"(every client back where it was: "
           f"{'yes' if moves['back where they were after add and remove'] else 'no'}) | 20 % |",
           f"| remove one of the four | {moves['remove one of 4: 4 → 3'] * 100:.1f} % (of which clients of "
           f"the other three: {moves['others moved'] * 100:.1f} %) | 25 % (1/4) |",
           "", "The L7 seed systems' ring (512 slots, 9 virtual nodes per server, request ids 0–99 999), "
           "simulated with the same changes:", "",
           "| change | requests that moved |", "| --- | --- |",
           f"| add a 5th server | {ring['add 4 → 5'] * 100:.1f} % |",
           f"| remove it again | {ring['remove the 5th: 5 → 4'] * 100:.1f} % |",
           f"| remove server 1 of 4 | {ring['remove server 1: 4 → 3'] * 100:.1f} % |",
           "| shares with 4 servers | "
           + ", ".join(f"{v * 100:.1f} %" for v in ring["shares with 4 servers"].values()) + " |",
           "", "Both are consistent hashing: a change moves only the keys of the server that joined or "
           "left. The ring hashes request ids and places 9 virtual nodes per server, so shares and "
           "moves follow where those few nodes fall; sluicegate's Maglev table (65 537 slots, weighted) "
           "hashes client addresses, so shares follow the weights and a join or leave of one of N moves "
           "close to 1/N."]
    with open(os.path.join(a.out, "distribution.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(os.path.join(a.out, "distribution.md"))
    if any(r["failed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
