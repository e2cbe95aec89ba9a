#!/usr/bin/env python3
"""UDP side by side: sluicegate's `protocol: udp` services against nginx `stream` UDP and no proxy at all
(issue 67, "Performance").

Usage (from the repository root; needs dnsperf, knotd, nginx with the stream module, gcc, make, taskset,
perf; Debian: apt install dnsperf knot nginx-light libnginx-mod-stream):
    python3 benchmarks/udp.py [--rounds 6] [--duration 5] [--proxies direct,sluicegate,nginx]
                              [--workloads dns,dns-paced,stream,hold-100,hold] [--sessions 100000]
    python3 benchmarks/udp.py --report benchmarks/results/udp-DATE.json   # the report again, nothing run

Proxies: direct (the load goes to the backends themselves), sluicegate (target/release/sluicegate,
built), nginx (`stream` with UDP listeners, one worker). Workloads, in this order each round:
    dns        dnsperf (4 clients, 100 outstanding) at saturation for --duration s against knotd with a
               zone this script writes (1,000 A records); one query per session (sluicegate
               `udp: {responses: 1}`, nginx `proxy_responses 1`)
               queries/s, machine CPU-s per 100k queries, the proxy's system calls and context switches
               per query, the machine's context switches per query
    dns-paced  the same at 20,000 queries/s (dnsperf -Q, -v: every answer's latency), for --duration s
               p50/p99 in µs; the difference to direct's in the same round is the proxy's hop
    stream     udpblast (benchmarks/udpblast, C): 4 flows of 1,200-byte datagrams, 16 unanswered per
               flow at most (64 in flight: 150 KB of buffer, within a socket's default 208 KiB, so
               that loss is the proxy's and not the load's), 500,000 in all (at most 20 s), to an echo
               backend (udpblast echo) that sends each back: both ways through the proxy
               machine CPU-s per GB (the bytes of both directions), the proxy's system calls per datagram
               (each direction's datagram counts once), datagrams lost, and the machine's UDP receive
               buffer drops (/proc/net/snmp RcvbufErrors: where they were lost)
    hold-100   100 client sockets (each bound to an address of 127.2.0.0/16, port 10999: a session each,
               and no ephemeral port taken from the proxy's backend sockets) send one
               datagram and wait for its echo, then 2,000 passes of one datagram each (200,000)
    hold       the same with --sessions sockets (capped by the descriptor limit, see below), then as
               many passes as make about 200,000 datagrams
               the proxy's RSS growth per session (and open descriptors), the kernel's slab growth per
               socket (UDP, sock_inode_cache, filp, dentry, eventpoll caches, from /proc/slabinfo;
               direct's run holds the client sockets only, so it is one socket's kernel cost), and
               CPU-µs of the proxy per datagram with that many sessions open, beside hold-100's

Fixture: knotd on 127.0.0.1:19053 (one UDP worker) and the echo backend on 19054, started once,
unpinned. The proxies listen on 18053 (DNS) and 18054 (echo; sluicegate `max_sessions: 100000`,
`idle_timeout: 60s`, nginx `proxy_timeout 60s`). The proxy on CPU 1, the load generators on CPU 0,
as in bench.py. Rounds are interleaved (every proxy once per round, the order rotated).

Measured as bench.py measures (its helpers are imported): machine CPU seconds from /proc/stat (every
CPU's busy time, so kernel work a proxy causes outside its process counts), the proxy's CPU from its
processes' /proc/PID/stat, its RSS from statm, its system calls with `perf stat -e
raw_syscalls:sys_enter` on its processes, context switches from /proc/stat's ctxt (machine) and
/proc/PID/status (the proxy's). Added machine CPU is a proxy's machine CPU per unit minus direct's in
the same round. The report gives medians with the lowest and highest round, and each goal of issue 67
as met or not.

The descriptor limit: every session holds one socket in each proxy (its backend side), and every
client socket one descriptor in udpblast. This script raises its soft limit to the hard one (it
never lowers a hard limit) and holds at most hard limit - 1,000 sessions; the report says when that
is fewer than --sessions. A second ceiling, for both proxies: each session's backend socket is bound
to an ephemeral port (net.ipv4.ip_local_port_range: 28,232 ports by default), so one proxy reaches one
backend address from at most that many sessions. All traffic is on loopback; every tool runs bounded
in count and time; a tool, backend or proxy that fails stops the run with what it said. Writes
udp-DATE.json and udp-DATE.md to --out.
"""
import contextlib
import json
import os
import resource
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import bench
from bench import CLIENT_CPU, TICK, ToolError, median, read, read_log, run_tool, spread, write

ROOT = bench.ROOT
DEFAULT_BIN = bench.DEFAULT_BIN
BLAST_DIR = os.path.join(ROOT, "benchmarks", "udpblast")
BLAST = os.path.join(BLAST_DIR, "udpblast")
PROXIES = ["direct", "sluicegate", "nginx"]
WORKLOADS = ["dns", "dns-paced", "stream", "hold-100", "hold"]
DNS_BACKEND, ECHO_BACKEND = 19053, 19054
DNS_LISTEN, ECHO_LISTEN = 18053, 18054
PACED_QPS = 20_000
ZONE, RECORDS = "bench.test", 1000
STREAM_FLOWS, STREAM_COUNT, STREAM_SIZE, STREAM_WINDOW, STREAM_LIMIT = 4, 500_000, 1200, 16, 20
HOLD_DATAGRAMS, HOLD_SIZE = 200_000, 100
# Kernel objects one UDP socket with a descriptor costs (read from /proc/slabinfo where root may).
SOCKET_SLABS = ("UDP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq")

# The goals of issue 67: (workload, figure, kind, bound, text). "peer": the median of the per-round ratio
# to nginx; "bound": the figure itself.
GOALS = [
    ("dns", "added_per_100k", "peer", 0.6, "DNS: added machine CPU per 100k queries ≤ 0.6 × nginx's"),
    ("dns", "qps", "peer-min", 1.3, "DNS: queries/s at saturation ≥ 1.3 × nginx's"),
    ("dns-paced", "added_p99_us", "bound", 100, "DNS: added p99 ≤ 100 µs at 20k queries/s"),
    ("stream", "added_per_gb", "peer", 0.5, "1,200-byte streams: added machine CPU per GB ≤ 0.5 × nginx's"),
    ("stream", "syscalls_per_dgram", "bound", 0.25, "1,200-byte streams: proxy system calls per datagram ≤ 0.25"),
    ("hold", "rss_bytes_per_session", "bound", 1024, "open sessions: RSS growth per session ≤ 1 KiB"),
    ("hold", "cpu_vs_100", "bound", 1.0, "open sessions: proxy CPU per datagram no higher than with 100"),
]


# --- parsers (tested in test_udp.py) ---------------------------------------------------------------------


def parse_dnsperf(out):
    """dnsperf's statistics: queries sent, completed, lost, queries/s, average latency (s). ValueError
    when it is not a report or nothing completed."""
    fields = {"sent": "Queries sent:", "completed": "Queries completed:", "lost": "Queries lost:",
              "qps": "Queries per second:", "avg_latency_s": "Average Latency (s):"}
    r = {}
    for key, label in fields.items():
        line = next((x for x in out.splitlines() if x.strip().startswith(label)), None)
        if line is None:
            raise ValueError(f"not a dnsperf report (no {label!r}): {bench.tail(out, 600)!r}")
        value = line.split(":", 1)[1].split()[0]
        r[key] = float(value) if key in ("qps", "avg_latency_s") else int(value)
    if r["completed"] == 0:
        raise ValueError(f"dnsperf completed no query: {bench.tail(out, 600)!r}")
    return r


def dnsperf_latencies(out):
    """The latency (s) of every answer dnsperf -v printed ("> NOERROR name A 0.000171")."""
    lats = []
    for line in out.splitlines():
        if line.startswith("> "):
            cols = line.split()
            with contextlib.suppress(ValueError, IndexError):
                lats.append(float(cols[-1]))
    return lats


def percentile(xs, q):
    """The nearest-rank q-th percentile (0 < q ≤ 100) of xs, or None for none."""
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, -(-len(xs) * q // 100) - 1))
    return xs[int(k)]


def udp_bound_in(proc_net_udp, port):
    """Whether /proc/net/udp's text has a socket bound to 127.0.0.1:port and not connected."""
    want = f"0100007F:{port:04X}"
    for line in proc_net_udp.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 2 and cols[1] == want and cols[2] == "00000000:0000":
            return True
    return False


def slab_bytes(slabinfo, caches=SOCKET_SLABS):
    """Bytes in use by the named caches of /proc/slabinfo: active objects × object size, summed."""
    total = 0
    for line in slabinfo.splitlines()[2:]:
        cols = line.split()
        if len(cols) > 3 and cols[0] in caches:
            total += int(cols[1]) * int(cols[3])
    return total


def status_ctxt(status):
    """Voluntary plus involuntary context switches of /proc/PID/status (one thread's, or the process's
    when read from /proc/PID/task/TID/status per thread)."""
    n = 0
    for line in status.splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            n += int(line.split()[1])
    return n


def udp_drops(proc_net_snmp):
    """The machine's UDP datagrams dropped so far, from /proc/net/snmp's `Udp:` lines (a header line naming
    the fields, then a line of values): {"rcvbuf": RcvbufErrors (a full receive buffer), "sndbuf":
    SndbufErrors, "in_errors": InErrors (all receive drops, RcvbufErrors included)}."""
    lines = [x.split() for x in proc_net_snmp.splitlines() if x.startswith("Udp:")]
    if len(lines) != 2 or "RcvbufErrors" not in lines[0]:
        raise ValueError("no Udp RcvbufErrors in /proc/net/snmp")
    values = dict(zip(lines[0][1:], lines[1][1:], strict=True))
    return {"rcvbuf": int(values["RcvbufErrors"]), "sndbuf": int(values["SndbufErrors"]),
            "in_errors": int(values["InErrors"])}


def parse_blast(out):
    """udpblast's JSON lines, as a list of dicts; ValueError when a line is not JSON."""
    lines = [x for x in out.splitlines() if x.strip()]
    if not lines:
        raise ValueError("udpblast printed nothing")
    return [json.loads(x) for x in lines]


# --- measuring -------------------------------------------------------------------------------------------


def proxy_ctxt(sid):
    """Context switches of every thread of the proxy's processes so far."""
    n = 0
    for pid in bench.session_pids(sid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError):
                    n += status_ctxt(read(f"/proc/{pid}/task/{tid}/status"))
    return n


def slabs():
    """Socket slab bytes now, or None where /proc/slabinfo cannot be read."""
    try:
        return slab_bytes(read("/proc/slabinfo"))
    except OSError:
        return None


class Window:
    """The counters of one measured stretch: machine CPU, context switches and UDP drops (a full socket
    buffer, anywhere on the machine: where lost datagrams went), the proxy's CPU, context switches and
    system calls."""

    def __init__(self, sid, work, syscalls=True):
        self.sid = sid
        self.perf = bench.SyscallCount(bench.session_pids(sid), work) if sid and syscalls and \
            bench.COUNT_SYSCALLS else None
        self.cpu0 = bench.cpu_seconds(sid) if sid else None
        self.pctxt0 = proxy_ctxt(sid) if sid else None
        self.drops0 = udp_drops(read("/proc/net/snmp"))
        stat = read("/proc/stat")
        self.machine0, self.ctxt0 = bench.busy_ticks(stat) / TICK, bench.ctxt_total(stat)

    def close(self):
        stat = read("/proc/stat")
        row = {"machine_cpu_s": bench.busy_ticks(stat) / TICK - self.machine0,
               "ctxt": bench.ctxt_total(stat) - self.ctxt0}
        drops = udp_drops(read("/proc/net/snmp"))
        row.update({f"udp_{k}_drops": drops[k] - self.drops0[k] for k in drops})
        if self.perf:
            row["syscalls"] = self.perf.stop()
        if self.sid:
            row["cpu_s"] = bench.cpu_seconds(self.sid) - self.cpu0
            row["proxy_ctxt"] = proxy_ctxt(self.sid) - self.pctxt0
        return row


def per(row, unit_key, scale, names):
    """row[name_per] = row[name] / row[unit_key] * scale, for each name measured."""
    n = row.get(unit_key)
    for name, out in names:
        if n and row.get(name) is not None:
            row[out] = row[name] / n * scale


def dns(port, duration, sid, work):
    w = Window(sid, work)
    p = run_tool(["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d",
                  os.path.join(work, "queries"), "-l", str(duration), "-c", "4", "-q", "100", "-t", "2"],
                 timeout=duration + 30)
    row = bench.parsed(parse_dnsperf, p)
    row.update(w.close())
    per(row, "completed", 1e5, [("machine_cpu_s", "machine_per_100k"), ("cpu_s", "cpu_per_100k")])
    per(row, "completed", 1, [("syscalls", "syscalls_per_query"), ("ctxt", "ctxt_per_query"),
                              ("proxy_ctxt", "proxy_ctxt_per_query")])
    return row


def dns_paced(port, duration, sid, work):
    # No perf here: it adds to every system call, and this workload measures latency.
    w = Window(sid, work, syscalls=False)
    p = run_tool(["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d",
                  os.path.join(work, "queries"), "-l", str(duration), "-c", "4", "-q", "500", "-t", "2",
                  "-Q", str(PACED_QPS), "-v"], timeout=duration + 30)
    row = bench.parsed(parse_dnsperf, p)
    lats = dnsperf_latencies(p.stdout)
    row.update(w.close())
    row["answers"] = len(lats)
    for q in (50, 99, 99.9):
        v = percentile(lats, q)
        row[f"p{q:g}_us".replace(".", "_")] = v * 1e6 if v is not None else None
    per(row, "completed", 1e5, [("machine_cpu_s", "machine_per_100k"), ("cpu_s", "cpu_per_100k")])
    return row


def stream(port, sid, work):
    w = Window(sid, work)
    p = run_tool(["taskset", "-c", CLIENT_CPU, BLAST, "flows", f"127.0.0.1:{port}", str(STREAM_FLOWS),
                  str(STREAM_COUNT), str(STREAM_LIMIT), str(STREAM_SIZE), str(STREAM_WINDOW)],
                 timeout=STREAM_LIMIT + 30)
    row = bench.parsed(parse_blast, p)[0]
    row.update(w.close())
    row["datagrams"] = row["sent"] + row["received"]
    row["bytes"] = row["datagrams"] * STREAM_SIZE
    row["mb_s"] = row["bytes"] / row["seconds"] / 1e6 if row["seconds"] else None
    per(row, "bytes", 1e9, [("machine_cpu_s", "machine_per_gb"), ("cpu_s", "cpu_per_gb")])
    per(row, "datagrams", 1, [("syscalls", "syscalls_per_dgram"), ("ctxt", "ctxt_per_dgram"),
                              ("proxy_ctxt", "proxy_ctxt_per_dgram")])
    return row


def read_line(proc, limit):
    """One line of `proc`'s stdout within `limit` s; ToolError when it ends or is silent."""
    ready, _, _ = select.select([proc.stdout], [], [], limit)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise ToolError(f"{shlex.join(proc.args)}: no answer within {limit} s")
    return json.loads(line)


def hold(port, n, sid, work):
    """n client sockets, a session each: what holding them costs, then datagrams over all of them."""
    passes = max(1, HOLD_DATAGRAMS // n)
    rss0 = bench.rss_kib(sid) if sid else None
    fds0 = bench.open_fds(sid) if sid else None
    slab0 = slabs()
    limit = 120
    proc = subprocess.Popen(["taskset", "-c", CLIENT_CPU, BLAST, "hold", f"127.0.0.1:{port}", str(n), str(passes),
                             str(limit), str(HOLD_SIZE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        held = read_line(proc, limit)
        time.sleep(0.5)  # answers in flight, sessions' tasks started
        row = {"sockets": held["sockets"], "held_sent": held["sent"], "held_answered": held["received"],
               "open_seconds": held["seconds"]}
        slab1 = slabs()
        if slab0 is not None and slab1 is not None:
            row["slab_bytes_per_socket"] = (slab1 - slab0) / held["sockets"] / (2 if sid else 1)
        if sid:
            row["rss_kib"] = bench.rss_kib(sid)
            row["sessions"] = bench.open_fds(sid) - fds0
            row["rss_growth_kib"] = row["rss_kib"] - rss0
            row["rss_bytes_per_session"] = row["rss_growth_kib"] * 1024 / max(row["sessions"], 1)
        w = Window(sid, work)
        proc.stdin.write("\n")
        proc.stdin.flush()
        done = read_line(proc, limit)
        row.update(w.close())
        row.update({"passes": done["passes"], "sent": done["sent"], "received": done["received"],
                    "lost": done["lost"], "seconds": done["seconds"]})
        proc.stdin.write("\n")
        proc.stdin.close()
        if proc.wait(timeout=30) != 0:
            raise ToolError(f"udpblast hold exited with {proc.returncode}: {proc.stderr.read()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    row["datagrams"] = row["sent"] + row["received"]
    per(row, "datagrams", 1e6, [("cpu_s", "cpu_us_per_dgram"), ("machine_cpu_s", "machine_us_per_dgram")])
    per(row, "datagrams", 1, [("syscalls", "syscalls_per_dgram")])
    return row


# --- the fixture and the proxies ---------------------------------------------------------------------------


def udp_bound(port):
    return udp_bound_in(read("/proc/net/udp"), port)


def wait_udp(port, proc, limit=10.0):
    end = time.time() + limit
    while time.time() < end:
        if udp_bound(port):
            return
        if proc.poll() is not None:
            raise ToolError(f"{shlex.join(proc.args)} exited with {proc.returncode} before binding UDP {port}")
        time.sleep(0.05)
    raise ToolError(f"nothing bound UDP {port} within {limit} s")


def dns_check(port, limit=5.0):
    """One query for ns.bench.test over plain sockets: the DNS server (or proxy) answers."""
    import socket
    q = bytes.fromhex("abcd01000001000000000000") + b"\x02ns\x05bench\x04test\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        end = time.time() + limit
        while time.time() < end:
            s.sendto(q, ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                a, _ = s.recvfrom(512)
                if a[:2] == q[:2]:
                    return
    raise ToolError(f"no DNS answer on 127.0.0.1:{port} within {limit} s")


class Fixture(bench.Fixture):
    """knotd with the benchmark's zone, and udpblast's echo backend, each logging to a file (bench.py's
    fixture: its start, check and close)."""

    wait = staticmethod(wait_udp)

    def __init__(self, work):  # not bench.Fixture's: its HTTP backends are not wanted here
        self.procs = []
        knot = os.path.join(work, "knot")
        os.makedirs(os.path.join(knot, "db"))
        records = [f"$ORIGIN {ZONE}.", "$TTL 3600", f"@ SOA ns.{ZONE}. admin.{ZONE}. 1 3600 600 86400 300",
                   "@ NS ns", "ns A 127.0.0.1"]
        records += [f"host{i} A 10.0.{i >> 8}.{i & 255}" for i in range(RECORDS)]
        write(os.path.join(knot, f"{ZONE}.zone"), "\n".join(records) + "\n")
        write(os.path.join(work, "queries"), "".join(f"host{i}.{ZONE} A\n" for i in range(RECORDS)))
        conf = os.path.join(knot, "knot.conf")
        write(conf, f"""server:
  listen: 127.0.0.1@{DNS_BACKEND}
  rundir: {knot}
  udp-workers: 1
  tcp-workers: 1
  background-workers: 1
control:
  listen: {knot}/knot.sock
database:
  storage: {knot}/db
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: {knot}
    file: "%s.zone"
zone:
  - domain: {ZONE}
""")
        self.start(["knotd", "-c", conf], DNS_BACKEND, os.path.join(work, "knot.log"))
        dns_check(DNS_BACKEND)
        self.start([BLAST, "echo", f"127.0.0.1:{ECHO_BACKEND}", "7200"], ECHO_BACKEND, os.path.join(work, "echo.log"))


def proxy_command(name, work, binary, sessions):
    """The command that runs `name` in the foreground, or None for direct."""
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    if name == "sluicegate":
        cfg = os.path.join(d, "sg.yaml")
        write(cfg, f"""log: {{level: warn}}
shutdown: {{drain_timeout: 1s}}
services:
  - name: dns
    protocol: udp
    listen: 127.0.0.1:{DNS_LISTEN}
    max_connections: 200000
    udp: {{responses: 1, idle_timeout: 10s, max_sessions: 100000}}
    backends:
      - {{address: "127.0.0.1:{DNS_BACKEND}"}}
  - name: echo
    protocol: udp
    listen: 127.0.0.1:{ECHO_LISTEN}
    max_connections: 200000
    udp: {{idle_timeout: 60s, max_sessions: {max(100_000, sessions)}}}
    backends:
      - {{address: "127.0.0.1:{ECHO_BACKEND}"}}
""")
        return [binary, "--config", cfg]
    if name == "nginx":
        cfg = os.path.join(d, "nginx.conf")
        module = "/usr/lib/nginx/modules/ngx_stream_module.so"
        load = f"load_module {module};\n" if os.path.exists(module) else ""
        # Two connections per UDP session (the client's, sharing the listen socket, and the upstream one).
        write(cfg, f"""{load}worker_processes 1; daemon off; pid {d}/pid; error_log {d}/error.log;
events {{ worker_connections {2 * max(100_000, sessions) + 1000}; }}
stream {{
  server {{ listen 127.0.0.1:{DNS_LISTEN} udp; proxy_pass 127.0.0.1:{DNS_BACKEND}; proxy_responses 1;
           proxy_timeout 10s; }}
  server {{ listen 127.0.0.1:{ECHO_LISTEN} udp; proxy_pass 127.0.0.1:{ECHO_BACKEND}; proxy_timeout 60s; }}
}}
""")
        return ["nginx", "-c", cfg, "-p", d]
    return None


class Proxy(bench.Proxy):
    """bench.py's proxy (pinned, in its own session, stopped with SIGTERM), ready once its UDP
    sockets are bound and it answers a DNS query."""

    def __init__(self, name, cmd, log):
        super().__init__(name, cmd, log)
        self.stopped = {0} if name == "sluicegate" else {0, -15}

    def start(self):
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out, start_new_session=True)
        try:
            wait_udp(DNS_LISTEN, self.proc)
            wait_udp(ECHO_LISTEN, self.proc)
            dns_check(DNS_LISTEN)
        except ToolError as e:
            self.kill()
            raise ToolError(f"{self.name} did not start: {e}: {read_log(self.log)}") from e


# --- the run --------------------------------------------------------------------------------------------------


def measure(proxies, workloads, a, sessions):
    """Every (round, proxy, workload): the rows of the report (bench.py's interleaved rounds). ToolError,
    with every process it started ended, when a tool, a backend or a proxy fails."""
    work = tempfile.mkdtemp(prefix="sg-udp-")
    os.chmod(work, 0o755)  # nginx workers run as an unprivileged user
    rows, fixture = [], None

    def start(p, rnd):
        cmd = proxy_command(p, work, a.bin, sessions)
        return Proxy(p, cmd, os.path.join(work, f"{p}-r{rnd}.log")) if cmd else None

    def run(p, proxy):
        sid = proxy.proc.pid if proxy else None
        dns_port, echo_port = (DNS_LISTEN, ECHO_LISTEN) if proxy else (DNS_BACKEND, ECHO_BACKEND)
        for w in workloads:
            if w == "dns":
                row = dns(dns_port, a.duration, sid, work)
            elif w == "dns-paced":
                row = dns_paced(dns_port, a.duration, sid, work)
            elif w == "stream":
                row = stream(echo_port, sid, work)
            else:
                row = hold(echo_port, 100 if w == "hold-100" else sessions, sid, work)
            row["workload"] = w
            yield row

    try:
        fixture = Fixture(work)
        bench.interleaved(proxies, a.rounds, fixture, start, run, rows, settle=0.5)
    finally:
        if fixture:
            fixture.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def derive(rows):
    """Per-round comparisons: added machine CPU and added p99 (against direct in the same round), and
    hold's CPU per datagram over hold-100's (the same proxy, the same round)."""
    bench.added_by_round(rows, "dns", "machine_per_100k", "added_per_100k")
    bench.added_by_round(rows, "stream", "machine_per_gb", "added_per_gb")
    bench.added_by_round(rows, "dns-paced", "p99_us", "added_p99_us")
    small = {(r["round"], r["proxy"]): r.get("cpu_us_per_dgram") for r in rows if r["workload"] == "hold-100"}
    for r in rows:
        base = small.get((r["round"], r["proxy"]))
        if r["workload"] == "hold" and base and r.get("cpu_us_per_dgram") is not None:
            r["cpu_vs_100"] = r["cpu_us_per_dgram"] / base


COLUMNS = {
    "dns": ["qps", "lost", "machine_per_100k", "added_per_100k", "cpu_per_100k", "syscalls_per_query",
            "proxy_ctxt_per_query", "ctxt_per_query"],
    "dns-paced": ["qps", "lost", "p50_us", "p99_us", "p99_9_us", "added_p99_us", "cpu_per_100k"],
    "stream": ["mb_s", "lost", "udp_rcvbuf_drops", "stalls", "machine_per_gb", "added_per_gb", "cpu_per_gb",
               "syscalls_per_dgram", "proxy_ctxt_per_dgram", "ctxt_per_dgram"],
    "hold-100": ["sockets", "sessions", "held_answered", "lost", "cpu_us_per_dgram", "machine_us_per_dgram",
                 "syscalls_per_dgram"],
    "hold": ["sockets", "sessions", "held_answered", "rss_growth_kib", "rss_bytes_per_session",
             "slab_bytes_per_socket", "lost", "cpu_us_per_dgram", "cpu_vs_100", "machine_us_per_dgram",
             "syscalls_per_dgram"],
}


def fmt(v):
    """Three significant digits; whole numbers from 1,000 up, with separators (no 1.47e+05)."""
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def cell(rows, key):
    m, sp = median([r.get(key) for r in rows]), spread([r.get(key) for r in rows])
    if m is None:
        return "–"
    return fmt(m) + ("" if sp is None or sp[0] == sp[1] else f" ({fmt(sp[0])}–{fmt(sp[1])})")


def ratios(rows, w, key, proxy, ref):
    return bench.ratio_by_round(rows, w, key, proxy, ref)


def goals(rows, proxy="sluicegate", peer="nginx"):
    """Each goal: (text, figure text, met) for `proxy`."""
    out = []
    for w, key, kind, bound, text in GOALS:
        ours = [r.get(key) for r in rows if r["workload"] == w and r["proxy"] == proxy]
        m = median(ours)
        if m is None:
            out.append((text, "not measured", None))
            continue
        sp = spread(ours)
        fig = f"{proxy} {fmt(m)} ({fmt(sp[0])}–{fmt(sp[1])})"
        peers = [r.get(key) for r in rows if r["workload"] == w and r["proxy"] == peer and r.get(key) is not None]
        if key.startswith("added_") and (sp[0] < 0 or (kind == "peer" and peers and min(peers) < 0)):
            # The baseline measured more than a proxy (ours, or the peer a ratio is taken to) in a
            # round: the machine's noise is larger than what the proxy adds, so this run cannot say.
            out.append((text, fig + "; below zero in a round: the machine's noise exceeds the proxy's cost, "
                        "no verdict", None))
            continue
        if kind in ("peer", "peer-min"):
            rs = ratios(rows, w, key, proxy, peer)
            theirs = median([r.get(key) for r in rows if r["workload"] == w and r["proxy"] == peer])
            if not rs:
                out.append((text, fig + f"; {peer} not measured", None))
                continue
            rm, rsp = median(rs), spread(rs)
            ok = rm >= bound if kind == "peer-min" else rm <= bound
            if kind == "peer" and theirs is not None and theirs <= 0:
                ok = m <= 0
            out.append((text, f"{fig}; {peer} {fmt(theirs)}; ratio by round {rm:.3f} ({rsp[0]:.2f}–{rsp[1]:.2f})",
                        ok))
        else:
            out.append((text, fig, m <= bound))
    return out


def report(rows, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stamp = meta["stamp"]
    with open(os.path.join(out_dir, f"udp-{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = [f"# UDP: sluicegate against nginx `stream` and direct ({meta['date']})", "",
          f"Command: `{meta['command']}`. Machine: {meta['cpus']} CPUs, {meta['kernel']}; proxy pinned to CPU "
          f"{bench.PROXY_CPU}, load on CPU {CLIENT_CPU}, backends (knotd {meta['knot']}, udpblast echo) unpinned; "
          f"{meta['rounds']} interleaved rounds, DNS for {meta['duration']} s each. Peer: {meta['nginx']}. "
          f"Sessions held: {meta['sessions']} (asked: {meta['sessions_asked']}; descriptor hard limit "
          f"{meta['nofile_hard']}).", "", "## Goals (issue 67)", "", "| goal | figure (median, lowest–highest) | met |",
          "| --- | --- | --- |"]
    for text, fig, ok in goals(rows):
        md.append(f"| {text} | {fig} | {'–' if ok is None else '**met**' if ok else '**not met**'} |")
    if meta["sessions"] < meta["sessions_asked"]:
        md += ["", f"The open-sessions goal asks for {meta['sessions_asked']:,} sessions; this machine's descriptor "
               f"hard limit ({meta['nofile_hard']:,}, no CAP_SYS_RESOURCE to raise it) caps every process, the "
               f"proxy included (one socket per session), so {meta['sessions']:,} were held."]
    for w in meta["workloads"]:
        cols = COLUMNS[w]
        md += ["", f"## {w}", "", "Medians of the rounds, (lowest–highest) beside them.", "",
               "| proxy | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
        for p in meta["proxies"]:
            rs = [r for r in rows if r["workload"] == w and r["proxy"] == p]
            if rs:
                md.append(f"| {p} | " + " | ".join(cell(rs, k) for k in cols) + " |")
        md += ["", "Per round:", "", "```"]
        md += [json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
               for r in rows if r["workload"] == w]
        md += ["```"]
    path = os.path.join(out_dir, f"udp-{stamp}.md")
    write(path, "\n".join(md) + "\n")
    return path


def main():
    ap = bench.arguments(__doc__, PROXIES, WORKLOADS, duration=5)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--report", metavar="JSON", help="write the report again from a run's JSON, measuring nothing")
    a = ap.parse_args()
    if a.report:
        with open(a.report) as f:
            run = json.load(f)
        derive(run["rows"])
        print(report(run["rows"], run["meta"], os.path.dirname(os.path.abspath(a.report))))
        return
    bench.COUNT_SYSCALLS = not a.no_syscalls
    proxies = [p for p in a.proxies.split(",") if p]
    workloads = [w for w in WORKLOADS if w in a.workloads.split(",")]
    a.duration = max(2, min(a.duration, 60))
    bench.need("taskset", "make", "dnsperf", "knotd", *(["perf"] * bench.COUNT_SYSCALLS),
               *(["nginx"] * ("nginx" in proxies)))
    subprocess.run(["make", "--quiet", "-C", BLAST_DIR, "udpblast"], check=True)
    if "sluicegate" in proxies and a.bin == DEFAULT_BIN:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    # Raise the soft descriptor limit to the hard one (never the hard one itself); the children inherit it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cap = hard - 1000 if hard != resource.RLIM_INFINITY else a.sessions
    sessions = max(100, min(a.sessions, cap))
    try:
        rows = measure(proxies, workloads, a, sessions)
        nginx_v = bench.first_line(run_tool(["nginx", "-v"], timeout=10)) if "nginx" in proxies else "none"
        knot_v = bench.first_line(run_tool(["knotd", "-V"], timeout=10))
    except ToolError as e:
        raise SystemExit(f"udp.py: {e}") from None
    derive(rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "stamp": time.strftime("%Y-%m-%d-%H%M"), "rounds": a.rounds,
            "duration": a.duration, "proxies": proxies, "workloads": workloads, "cpus": os.cpu_count(),
            "kernel": os.uname().release, "command": "python3 benchmarks/udp.py " + " ".join(sys.argv[1:]),
            "nginx": nginx_v, "knot": knot_v, "sessions": sessions, "sessions_asked": a.sessions,
            "nofile_hard": hard}
    print(report(rows, meta, a.out))


if __name__ == "__main__":
    main()
