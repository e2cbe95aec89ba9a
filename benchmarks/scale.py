#!/usr/bin/env python3
"""What the admin side costs per backend: sluicegate idle with 10, 1,000 and 10,000 static backends.

Usage (from the repository root):
    python3 benchmarks/scale.py [--bin target/release/sluicegate] [--before OTHER_BINARY]
                                [--backends 10,1000,10000] [--duration 30] [--scrape-every 5]
                                [--out benchmarks/results]

For each binary (`--before`, when given, then `--bin`) and each backend count, starts the binary with
one service (`weighted_round_robin`, health checks off) whose backends are loopback addresses nobody
listens on (127.10.x.y:9000: no traffic is sent to them, nothing probes them) and the admin API on a
free loopback port. Once both ports listen it watches the process for `--duration` seconds: every
second its RSS (VmRSS), every `--scrape-every` seconds one `GET /metrics` and one `GET /stats` (what a
Prometheus and a dashboard would ask for), and at the end one `GET /stats?history=1`. From
/proc/PID/stat and /proc/PID/task/*/stat it reads the CPU time of the whole process and of the admin
thread (`sluicegate-admin`: the stats sampler and every admin request) over the window.

Reports per run: time until both ports listen (start-up: config validation, the first snapshot), CPU
of the process and of the admin thread as a share of one core, RSS at the start and at the end of the
window and its growth per second, the mean time and size of the scrapes. Writes a dated Markdown table
to --out (scale-DATE.md) and prints it. Loopback only; every run is bounded by --duration and a 120 s
start-up limit.
"""
import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_HZ = os.sysconf("SC_CLK_TCK")
START_LIMIT = 120.0
# A scrape that takes longer is given up, and that path is not asked again in the run (an admin thread
# that busy would only queue more).
SCRAPE_LIMIT = 30.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_addr(i):
    # 127.10.0.1 upwards, skipping .0 and .255 in the last octet.
    hi, lo = divmod(i, 254)
    return f"127.10.{hi}.{lo + 1}:9000"


def config(n, listen, admin):
    lines = [
        "log: {level: warn}",
        f"admin: {{listen: \"127.0.0.1:{admin}\"}}",
        "services:",
        "  - name: web",
        f"    listen: 127.0.0.1:{listen}",
        "    balance: weighted_round_robin",
        "    backends:",
    ]
    lines += [f"      - {{address: \"{backend_addr(i)}\"}}" for i in range(n)]
    return "\n".join(lines) + "\n"


def cpu_ticks(path):
    """utime + stime from a /proc stat file (the fields after the command name)."""
    with open(path) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def admin_thread_ticks(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip().startswith("sluicegate-adm"):
                    total += cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            pass
    return total


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def listening(port):
    """Whether a socket listens on 127.0.0.1:`port` (read from /proc/net/tcp: no connection is made,
    and the admin thread, which may be too busy to answer, is not asked)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in f.readlines()[1:])


def fetch(admin, path, timeout=SCRAPE_LIMIT):
    """(status, bytes, seconds); status None when no answer came within `timeout`."""
    t = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=timeout) as r:
            body = r.read()
            status = r.status
    except (OSError, TimeoutError):
        return None, 0, time.monotonic() - t
    return status, len(body), time.monotonic() - t


def mean_of(results, i, scale):
    """Mean of field `i` of the answered results, or "timed out" when none answered."""
    ok = [r[i] for r in results if r[0] == 200]
    if not ok:
        return "timed out"
    text = f"{scale * statistics.fmean(ok):.1f}"
    missed = len(results) - len(ok)
    return text + (f" ({missed} timed out)" if missed else "")


def run(binary, n, duration, every):
    listen, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scale.yaml")
        with open(path, "w") as f:
            f.write(config(n, listen, admin))
        started = time.monotonic()
        proc = subprocess.Popen([binary, "-c", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ready = None
            while time.monotonic() - started < START_LIMIT:
                if proc.poll() is not None:
                    raise RuntimeError(f"{binary} exited: {proc.stderr.read().decode()[-2000:]}")
                if listening(listen) and listening(admin):
                    ready = time.monotonic() - started
                    break
                time.sleep(0.05)
            if ready is None:
                raise RuntimeError(f"not listening within {START_LIMIT} s")
            pid = proc.pid
            t0 = time.monotonic()
            cpu0, adm0, rss0 = cpu_ticks(f"/proc/{pid}/stat"), admin_thread_ticks(pid), rss_bytes(pid)
            rss = [(0.0, rss0)]
            scrapes = {"/metrics": [], "/stats": []}
            next_scrape = t0
            while (now := time.monotonic()) - t0 < duration:
                if now >= next_scrape:
                    for p in scrapes:
                        if all(r[0] == 200 for r in scrapes[p]):
                            scrapes[p].append(fetch(admin, p))
                    next_scrape += every
                time.sleep(max(0.0, min(1.0, t0 + duration - time.monotonic())))
                rss.append((time.monotonic() - t0, rss_bytes(pid)))
            history = fetch(admin, "/stats?history=1")
            elapsed = time.monotonic() - t0
            cpu1, adm1 = cpu_ticks(f"/proc/{pid}/stat"), admin_thread_ticks(pid)
            rss1 = rss_bytes(pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # RSS growth: least-squares slope over the window, skipping its first 5 s (start-up settling).
    pts = [(t, r) for t, r in rss if t >= 5.0] or rss
    if len(pts) >= 2:
        mt = statistics.fmean(t for t, _ in pts)
        mr = statistics.fmean(r for _, r in pts)
        den = sum((t - mt) ** 2 for t, _ in pts)
        slope = sum((t - mt) * (r - mr) for t, r in pts) / den if den else 0.0
    else:
        slope = 0.0
    return {
        "backends": n,
        "ready_s": ready,
        "cpu_pct": 100.0 * (cpu1 - cpu0) / USER_HZ / elapsed,
        "admin_pct": 100.0 * (adm1 - adm0) / USER_HZ / elapsed,
        "rss_start_mb": rss0 / 1e6,
        "rss_end_mb": rss1 / 1e6,
        "rss_growth_kbs": slope / 1e3,
        "metrics_ms": mean_of(scrapes["/metrics"], 2, 1e3),
        "metrics_kb": mean_of(scrapes["/metrics"], 1, 1e-3),
        "stats_ms": mean_of(scrapes["/stats"], 2, 1e3),
        "stats_kb": mean_of(scrapes["/stats"], 1, 1e-3),
        "history_ms": mean_of([history], 2, 1e3),
        "history_kb": mean_of([history], 1, 1e-3),
    }


def table(label, rows):
    out = [f"#### {label}", "",
           "| backends | listening after (s) | process CPU (% of a core) | admin thread CPU | RSS start → end (MB) "
           "| RSS growth (kB/s) | `/metrics` (ms, kB) | `/stats` (ms, kB) | `/stats?history=1` (ms, kB) |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(
            f"| {r['backends']:,} | {r['ready_s']:.2f} | {r['cpu_pct']:.1f} | {r['admin_pct']:.1f} | "
            f"{r['rss_start_mb']:.1f} → {r['rss_end_mb']:.1f} | {r['rss_growth_kbs']:.0f} | "
            f"{r['metrics_ms']}, {r['metrics_kb']} | {r['stats_ms']}, {r['stats_kb']} | "
            f"{r['history_ms']}, {r['history_kb']} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "sluicegate"))
    ap.add_argument("--before", help="a second binary (the one before a change), run first")
    ap.add_argument("--backends", default="10,1000,10000")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--scrape-every", type=float, default=5.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()
    counts = [int(x) for x in a.backends.split(",")]
    binaries = ([("before", a.before)] if a.before else []) + [("after" if a.before else "this build", a.bin)]
    report = []
    for label, binary in binaries:
        rows = []
        for n in counts:
            print(f"{label}: {n} backends, {a.duration:.0f} s ...", file=sys.stderr, flush=True)
            rows.append(run(binary, n, a.duration, a.scrape_every))
        report.append(table(f"{label}: `{binary}`", rows))
        print(report[-1], flush=True)
    os.makedirs(a.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    path = os.path.join(a.out, f"scale-{stamp}.md")
    with open(path, "w") as f:
        f.write(f"# Admin cost per backend ({stamp})\n\n")
        f.write("`python3 benchmarks/scale.py " + " ".join(sys.argv[1:]) + "`\n\n")
        f.write("\n".join(report))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
