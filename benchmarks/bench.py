#!/usr/bin/env python3
"""Side-by-side benchmark of sluicegate against HAProxy, nginx `stream` and no proxy at all.

Usage (from the repository root; needs wrk, iperf3, haproxy, nginx with the stream module, taskset, perf):
    python3 benchmarks/bench.py [--rounds 6] [--duration 10] [--proxies a,b] [--workloads a,b] [--no-syscalls]

Proxies: direct, sg-copy, sg-splice, sg-epoll, sg-ring, sg-auto (the ring where io_uring is allowed,
else epoll; target/release/sluicegate, built; `sg-auto@PATH` runs another build, an earlier
commit's, beside it, and `sg-uring@PATH` the io_uring engine retired in issue 66 from a build
before it), sg-auto-log (sg-auto writing the routing-decision
line of every connection, JSON, to a file), haproxy, haproxy-splice (`option splice-auto`),
haproxy-splice-all (`option splice-request` + `splice-response`), haproxy-smart (`option
tcp-smart-connect`: the handshake's last ACK sent with the first bytes, as sluicegate's ring
does), nginx (`stream`), probe-LEVERS: the C ring probe of benchmarks/probes/ (built with make) with
the levers its name lists, e.g. probe-ms+reg, and eprobe-LEVERS: its C epoll probe, e.g. eprobe-base.
Workloads, in this order:
    ka      wrk -t1 -c64 keep-alive GET /tiny (16 bytes)            req/s, p50/p99, CPU-s per 100k
    lat     64 keep-alive connections at 2000 req/s in all (sluicegate-load, open loop: wrk cannot pace)
            p50/p99 latency; the same client for every proxy, so the difference to direct is the hop
    bulk    wrk -t1 -c16 GET /1m.bin (1 MiB)                        MB/s, p50/p99, CPU-s per GB
    stream  one iperf3 stream for the whole duration                Gbit/s, CPU-s per GB
    idle    10 000 idle connections held through the proxy          RSS per connection
    churn   wrk -t1 -c64 with `Connection: close` (runs last: it leaves TIME_WAIT behind)
            req/s, p50/p99, CPU-s per 100k

Fixture: three nginx backends on 127.0.0.1:19001-19003 and an iperf3 server on 19201, started once.
Every proxy listens on 127.0.0.1:18080 (HTTP backends) and 18081 (iperf3). Pinning on a 2-core machine:
the proxy on CPU 1, the load generators on CPU 0, the backends unpinned (`direct` has no proxy, so its
"proxy CPU" column is empty). Rounds are interleaved (every proxy once per round, the order rotated),
so machine noise shows as spread between rounds instead of a bias for one proxy.

Measured per (round, proxy, workload): throughput, p50/p99 latency (wrk), proxy CPU seconds (utime +
stime of every process in the proxy's session, from /proc), machine CPU seconds (every CPU's busy time
from /proc/stat, which also counts kernel work a proxy causes outside its own process; split by kind
into user, system, interrupts (soft ones included: on loopback, TCP's receive work) and steal), proxy RSS (sum
of VmRSS; for `idle`, the growth per held connection), and counts, which do not drift with the machine's
noise as times do: the proxy's system calls (`perf stat -e raw_syscalls:sys_enter` on its processes),
the machine's context switches (/proc/stat ctxt), IPIs (/proc/interrupts RES, CAL, TLB) and interrupts,
per request or per MB. The report gives medians with the lowest and highest round, and compares proxies
by **added machine CPU**: machine CPU per unit of work minus the `direct` run's in the same round, and
its ratio to the best peer's taken round by round. Writes bench-DATE.json, bench-DATE.md and
bench-DATE-*.svg charts to --out. All traffic is on loopback; every workload is bounded in time. A tool
that fails (its exit code), a backend or a proxy that dies, or an output that does not parse stops the
run with what the tool said.
"""
import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIN = os.path.join(ROOT, "target", "release", "sluicegate")
LOAD_BIN = os.path.join(ROOT, "target", "release", "sluicegate-load")
PROBES = os.path.join(ROOT, "benchmarks", "probes")
PROBE_BIN = os.path.join(PROBES, "ring-proxy")
EPOLL_PROBE_BIN = os.path.join(PROBES, "epoll-proxy")
PROXIES = ["direct", "sg-copy", "sg-splice", "sg-epoll", "sg-ring", "sg-auto", "sg-auto-log", "haproxy",
           "haproxy-splice", "haproxy-splice-all", "haproxy-smart", "nginx"]
WORKLOADS = ["ka", "lat", "bulk", "stream", "idle", "churn"]
# The `lat` workload: 64 keep-alive connections at a fixed total rate, far below saturation, so the
# latency is the proxy's added hop rather than queueing behind a saturated CPU (what wrk's p99 shows).
LAT_CONNECTIONS, LAT_RATE = 64, 2000
BACKENDS = [19001, 19002, 19003]
IPERF_BACKEND = 19201
LISTEN, IPERF_LISTEN = 18080, 18081
PROXY_CPU, CLIENT_CPU = "1", "0"
IDLE_CONNECTIONS = 10_000
# Set from the descriptor limit in main(): a proxy holds two descriptors per connection.
MAXCONN = 40_000
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class ToolError(RuntimeError):
    """A tool the benchmark runs failed or died: its command, how it ended and what it said. The run
    stops: a measurement taken with a broken tool or server is not a measurement."""


def tail(text, n=2000):
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def run_tool(cmd, timeout):
    """Runs `cmd` to its end: the CompletedProcess, or ToolError with its exit code and stderr (its
    stdout when stderr is empty: iperf3 -J reports errors there)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{shlex.join(cmd)}: still running after {timeout} s") from e
    except OSError as e:
        raise ToolError(f"{shlex.join(cmd)}: {e}") from e
    if p.returncode != 0:
        raise ToolError(f"{shlex.join(cmd)} exited with {p.returncode}: {tail(p.stderr or p.stdout)}")
    return p


def parsed(parser, p):
    """`parser` on a finished tool's stdout; ToolError naming the tool when the output is not what
    it should be."""
    try:
        return parser(p.stdout)
    except (ValueError, KeyError, TypeError) as e:
        raise ToolError(f"{shlex.join(p.args)}: {e}") from e


def read_log(path):
    try:
        with open(path, errors="replace") as f:
            return tail(f.read())
    except OSError as e:
        return f"(no log: {e})"


def need(*tools):
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (Debian: apt install wrk iperf3 haproxy "
                         f"nginx-light libnginx-mod-stream util-linux)")


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def listens_in(proc_net_tcp, port):
    """Whether /proc/net/tcp's text has a socket listening (state 0A) on 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    for line in proc_net_tcp.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 3 and cols[1] == want and cols[3] == "0A":
            return True
    return False


def listening(port):
    """Whether a socket listens on 127.0.0.1:port (read from /proc, without connecting: a probe
    connection would count as a test run for iperf3's server)."""
    return listens_in(read("/proc/net/tcp"), port)


def wait_port(port, proc=None, limit=10.0):
    """Waits until something listens on `port`; ToolError when `proc` (what should listen) exits first."""
    end = time.time() + limit
    while time.time() < end:
        if listening(port):
            return
        if proc is not None and proc.poll() is not None:
            raise ToolError(f"{shlex.join(proc.args)} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stat_fields(stat):
    """The fields of /proc/PID/stat after the command name, which may hold spaces and parentheses:
    [0] is field 3 (state), [3] the session, [11:15] utime, stime, cutime, cstime (in ticks)."""
    return stat[stat.rindex(")") + 2:].split()


def stat_session(stat):
    return int(stat_fields(stat)[3])


def stat_cpu_ticks(stat):
    """utime + stime + cutime + cstime: the CPU of the process and of its children it waited for."""
    f = stat_fields(stat)
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def busy_ticks(proc_stat):
    """Busy ticks of every CPU from /proc/stat's first line: user, nice, system, irq, softirq and
    steal (idle and iowait are not busy; guest time is already counted in user)."""
    f = [int(x) for x in proc_stat.splitlines()[0].split()[1:]]
    return sum(f[:8]) - f[3] - f[4]


# The kinds of busy time `busy_split` sums /proc/stat's columns into (user with nice, system, interrupt:
# irq with softirq, steal): where a proxy's added machine CPU goes. On loopback softirq is mostly the kernel's TCP
# receive work, run in the sending task's context or in ksoftirqd. (With tick-based accounting, as on
# this kernel, a tick that lands there counts as softirq here and as system time of the task it
# interrupted, which may be the proxy.)
SPLIT = ("user", "system", "interrupt", "steal")


def busy_split(proc_stat):
    """Busy ticks of every CPU from /proc/stat's first line, by kind (`SPLIT`); their sum is
    `busy_ticks`'s."""
    f = [int(x) for x in proc_stat.splitlines()[0].split()[1:]]
    return {"user": f[0] + f[1], "system": f[2], "interrupt": f[5] + f[6], "steal": f[7]}


def statm_rss_kib(statm, page=PAGE):
    """The resident set of /proc/PID/statm (its second field, in pages), in KiB."""
    return int(statm.split()[1]) * page // 1024


def session_pids(sid):
    pids = []
    for d in os.listdir("/proc"):
        # A process may end between the listing and the read.
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if stat_session(read(f"/proc/{d}/stat")) == sid:
                    pids.append(int(d))
    return pids


def ctxt_total(proc_stat):
    """Context switches of the whole machine since boot: /proc/stat's `ctxt` line."""
    for line in proc_stat.splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise ValueError("no ctxt line in /proc/stat")


# The inter-processor interrupts a wake-up on another CPU costs: rescheduling, function call and TLB
# shootdown IPIs (/proc/interrupts' RES, CAL and TLB rows).
IPI_ROWS = ("RES", "CAL", "TLB")


def interrupt_totals(proc_interrupts):
    """(IPIs, all interrupts) of the whole machine since boot, from /proc/interrupts: every row's
    per-CPU counts summed (rows such as ERR and MIS have one count, or none, and are skipped)."""
    lines = proc_interrupts.splitlines()
    ncpu = len(lines[0].split())
    ipi = total = 0
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        cols = rest.split()[:ncpu]
        if len(cols) < ncpu or not all(c.isdigit() for c in cols):
            continue
        n = sum(int(c) for c in cols)
        total += n
        if name.strip() in IPI_ROWS:
            ipi += n
    return ipi, total


def tcp_segments_out(proc_net_snmp):
    """TCP segments the machine has sent since boot: /proc/net/snmp's `Tcp:` OutSegs (a header line
    naming the fields, then a line of values). On loopback each is also one received."""
    lines = [line.split() for line in proc_net_snmp.splitlines() if line.startswith("Tcp:")]
    if len(lines) != 2 or "OutSegs" not in lines[0]:
        raise ValueError("no Tcp OutSegs in /proc/net/snmp")
    return int(lines[1][lines[0].index("OutSegs")])


def machine_counters():
    """Machine-wide context switches, IPIs, interrupts and TCP segments sent so far."""
    ipi, irq = interrupt_totals(read("/proc/interrupts"))
    return {"ctxt": ctxt_total(read("/proc/stat")), "ipi": ipi, "irq": irq,
            "segs": tcp_segments_out(read("/proc/net/snmp"))}


def parse_perf_count(out):
    """The count of `perf stat -x,`'s one event; ValueError when perf could not count it
    ("<not counted>", "<not supported>") or printed something else."""
    for line in out.splitlines():
        cols = line.split(",")
        if len(cols) > 2 and cols[2].startswith("raw_syscalls:sys_enter"):
            if not cols[0].strip().isdigit():
                raise ValueError(f"perf did not count system calls: {line!r}")
            return int(cols[0])
    raise ValueError(f"not a perf stat -x, report: {tail(out, 600)!r}")


class SyscallCount:
    """System calls entered by every thread of the proxy's processes while it runs: `perf stat -e
    raw_syscalls:sys_enter -p PIDS` (a tracepoint: it works where hardware counters do not), pinned
    to the client CPU. Tracepoints count exactly, so this does not drift from round to round as
    times do; it adds a few tens of nanoseconds to each system call, for every proxy alike."""

    def __init__(self, pids, work):
        self.out = os.path.join(work, "perf-stat.csv")
        self.proc = subprocess.Popen(
            ["taskset", "-c", CLIENT_CPU, "perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-o", self.out,
             "-p", ",".join(str(p) for p in pids)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # perf attaches asynchronously; a short pause makes sure the workload is inside the window.
        time.sleep(0.3)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise ToolError("perf stat did not stop within 15 s of SIGINT") from None
        try:
            return parse_perf_count(read(self.out))
        except (OSError, ValueError) as e:
            raise ToolError(f"perf stat: {e}; it said: {tail(err, 600)}") from e


def machine_busy_seconds():
    """Busy seconds of every CPU (all but idle and iowait), from /proc/stat."""
    return busy_ticks(read("/proc/stat")) / TICK


def cpu_seconds(sid):
    total = 0
    for pid in session_pids(sid):
        # A process of the session may end between the listing and the read.
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += stat_cpu_ticks(read(f"/proc/{pid}/stat"))
    return total / TICK


def open_fds(sid):
    total = 0
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def rss_kib(sid):
    total = 0
    for pid in session_pids(sid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += statm_rss_kib(read(f"/proc/{pid}/statm"))
    return total


class Fixture:
    """The backends every proxy is measured against: three nginx and an iperf3 server, each logging to
    a file of its own in `work`."""

    def __init__(self, work):
        self.work = work
        self.procs = []  # (process, its log file)
        www = os.path.join(work, "www")
        os.makedirs(www)
        with open(os.path.join(www, "1m.bin"), "wb") as f:
            f.write(os.urandom(1 << 20))
        for port in BACKENDS:
            d = os.path.join(work, f"b{port}")
            os.makedirs(d)
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(f"""worker_processes 1; daemon off; pid {d}/pid; error_log {d}/error.log;
worker_rlimit_nofile 30000;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /tiny {{ add_header X-Backend b{port}; return 200 "0123456789abcde\\n"; }}
    location / {{ root {www}; }} }} }}
""")
            self.start(["nginx", "-c", conf, "-p", d], port, os.path.join(d, "error.log"))
        self.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_BACKEND)], IPERF_BACKEND,
                   os.path.join(work, "iperf3.log"))

    # How `start` waits for a backend to serve `port`: TCP listening (udp.py's backends wait for a bound
    # UDP socket).
    wait = staticmethod(wait_port)

    def start(self, cmd, port, log):
        with open(log, "a") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        self.procs.append((proc, log))
        try:
            self.wait(port, proc)
        except (ToolError, RuntimeError) as e:
            raise ToolError(f"{e}: {read_log(log)}") from e

    def check(self):
        """ToolError if a backend has died (what was measured since is not a measurement)."""
        for p, log in self.procs:
            if p.poll() is not None:
                raise ToolError(f"backend {shlex.join(p.args)} exited with {p.returncode}: {read_log(log)}")

    def close(self):
        for p, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in self.procs:
            p.wait(timeout=10)


def probe_targets(proxies):
    """The probe binaries these proxies need built: the epoll probe needs only a C compiler, the
    ring probe also liburing."""
    return [t for t, prefix in (("ring-proxy", "probe-"), ("epoll-proxy", "eprobe-"))
            if any(p.startswith(prefix) for p in proxies)]


def proxy_command(name, work, binary):
    """The command that runs `name` in the foreground, or None for direct."""
    d = os.path.join(work, name.replace("/", "_"))
    os.makedirs(d, exist_ok=True)
    if name.startswith("sg-"):
        cfg = os.path.join(d, "sg.yaml")
        # "sg-auto@/path/to/sluicegate": another build (an earlier commit's) beside this one.
        variant, _, other = name.partition("@")
        binary = other or binary
        relay = variant[3:].removesuffix("-log")
        # sg-auto-log: the routing-decision line of every connection written (JSON, to a file), to show
        # what it costs; the other variants log warnings only, like the peers' configs.
        log = (f"log: {{level: info, format: json, file: {d}/route.log}}" if variant.endswith("-log")
               else "log: {level: warn}")
        lines = [log, "shutdown: {drain_timeout: 1s}", "services:"]
        for svc, port, backends in [("http", LISTEN, BACKENDS), ("iperf", IPERF_LISTEN, [IPERF_BACKEND])]:
            lines += [f"  - name: {svc}", f"    listen: 127.0.0.1:{port}", "    balance: round_robin",
                      f"    relay: {relay}", "    max_connections: 100000", "    backends:"]
            lines += [f"      - {{address: \"127.0.0.1:{b}\"}}" for b in backends]
        write(cfg, "\n".join(lines) + "\n")
        return [binary, "--config", cfg]
    if name.startswith("haproxy"):
        cfg = os.path.join(d, "haproxy.cfg")
        splice = {"haproxy-splice": "  option splice-auto\n",
                  "haproxy-splice-all": "  option splice-request\n  option splice-response\n"}.get(name, "")
        smart = "  option tcp-smart-connect\n" if name == "haproxy-smart" else ""
        # Splicing HAProxy also reserves two descriptors per pipe: fewer connections fit the limit.
        maxconn = MAXCONN - 1100 if splice else MAXCONN
        pipes = "  maxpipes 1000\n" if splice else ""
        servers = "".join(f"  server b{b} 127.0.0.1:{b}\n" for b in BACKENDS)
        write(cfg, f"""global
  nbthread 1
  maxconn {maxconn}
{pipes}defaults
  mode tcp
  timeout connect 5s
  timeout client 1m
  timeout server 1m
{splice}{smart}frontend http
  bind 127.0.0.1:{LISTEN}
  default_backend http
backend http
  balance roundrobin
{servers}frontend iperf
  bind 127.0.0.1:{IPERF_LISTEN}
  default_backend iperf
backend iperf
  server i 127.0.0.1:{IPERF_BACKEND}
""")
        return ["haproxy", "-db", "-f", cfg]
    if name.startswith(("probe-", "eprobe-")):
        # A C probe of benchmarks/probes/ with the levers its name lists ("probe-ms+reg": one ring;
        # "eprobe-base": one thread's epoll), both services.
        binary, levers = name.split("-", 1)
        backends = ",".join(f"127.0.0.1:{b}" for b in BACKENDS)
        return [PROBE_BIN if binary == "probe" else EPOLL_PROBE_BIN, "--levers", levers,
                f"127.0.0.1:{LISTEN}={backends}", f"127.0.0.1:{IPERF_LISTEN}=127.0.0.1:{IPERF_BACKEND}"]
    if name == "nginx":
        cfg = os.path.join(d, "nginx.conf")
        module = next((m for m in ["/usr/lib/nginx/modules/ngx_stream_module.so"] if os.path.exists(m)), None)
        load = f"load_module {module};\n" if module else ""
        servers = "".join(f"    server 127.0.0.1:{b};\n" for b in BACKENDS)
        write(cfg, f"""{load}worker_processes 1; daemon off; pid {d}/pid; error_log {d}/error.log;
events {{ worker_connections {MAXCONN}; }}
stream {{
  upstream http {{
{servers}  }}
  server {{ listen 127.0.0.1:{LISTEN} backlog=4096; proxy_pass http; }}
  server {{ listen 127.0.0.1:{IPERF_LISTEN}; proxy_pass 127.0.0.1:{IPERF_BACKEND}; }}
}}
""")
        return ["nginx", "-c", cfg, "-p", d]
    return None


def wrk_duration_ms(v):
    """wrk's duration ("812.00us", "1.50ms", "2.01s", "1.00m", "1.00h") in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", v)
    if not m:
        raise ValueError(f"not a wrk duration: {v!r}")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[m.group(2)]


# wrk's sizes are binary: "1.23MB" is 1.23 × 2^20 bytes.
WRK_SIZES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


class Proxy:
    """One proxy under test: pinned to PROXY_CPU, in a session of its own (its CPU and memory are the
    session's), its output in a log file."""

    def __init__(self, name, cmd, log):
        self.name, self.cmd, self.log, self.proc = name, ["taskset", "-c", PROXY_CPU, *cmd], log, None
        # sluicegate drains on SIGTERM and exits 0; HAProxy in the foreground (-db) dies of it.
        self.stopped = {0} if name.startswith("sg-") else {0, -signal.SIGTERM}

    def start(self):
        with open(self.log, "a") as out:
            for _ in range(3):
                self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out, start_new_session=True)
                try:
                    wait_port(LISTEN, self.proc)
                    wait_port(IPERF_LISTEN, self.proc)
                    return
                except (ToolError, RuntimeError):
                    # The previous proxy's sockets may still be closing: try again shortly.
                    self.kill()
                    time.sleep(3)
        raise ToolError(f"{self.name} did not start ({shlex.join(self.cmd)}): {read_log(self.log)}")

    def check(self):
        """ToolError if the proxy has died (what was measured since is not a measurement)."""
        if self.proc.poll() is not None:
            raise ToolError(f"{self.name} exited with {self.proc.returncode} during the run: {read_log(self.log)}")

    def stop(self):
        """SIGTERM, as a service manager stops it; ToolError unless it ends as it should within 15 s."""
        self.check()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ToolError(f"{self.name} did not exit within 15 s of SIGTERM: {read_log(self.log)}") from None
        if code not in self.stopped:
            raise ToolError(f"{self.name} exited with {code} on SIGTERM: {read_log(self.log)}")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def parse_wrk(out):
    """wrk --latency's report: requests/s, requests, bytes read, p50/p99 in ms, and errors (socket
    errors plus non-2xx/3xx answers). ValueError when it is not one, or when no request completed
    (wrk then still exits 0, with latencies of 0)."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)$", out, re.M)
    total = re.search(r"^\s*(\d+) requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read$", out, re.M)
    if not rps or not total:
        raise ValueError(f"not a wrk report: {tail(out, 600)!r}")
    if int(total.group(1)) == 0:
        raise ValueError(f"wrk completed no request: {tail(out, 600)!r}")
    p50 = re.search(r"^\s+50%\s+(\S+)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)$", out, re.M)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = (sum(int(x) for x in errors.groups()) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)),
            "bytes": float(total.group(2)) * WRK_SIZES[total.group(3)],
            "p50_ms": wrk_duration_ms(p50.group(1)) if p50 else None,
            "p99_ms": wrk_duration_ms(p99.group(1)) if p99 else None, "errors": errs}


def parse_iperf3(out):
    """iperf3 -J's report of one client run: what the receiver got, in Gbit/s and bytes. ValueError
    when iperf3 reported an error or no result."""
    j = json.loads(out)
    if j.get("error"):
        raise ValueError(f"iperf3: {j['error']}")
    end = j["end"]["sum_received"]
    return {"gbit_s": end["bits_per_second"] / 1e9, "bytes": end["bytes"]}


def parse_load(out):
    """sluicegate-load --json's report: successes, latency percentiles (none when nothing succeeded),
    requests/s, failures, and in open loop the tool's own lag in sending (not in the latency) and the
    requests counted from when they were due, an earlier answer having held them up (none
    from a build before it was reported)."""
    r = json.loads(out)
    lat = r.get("latency") or {}
    lag = r.get("lag") or {}
    return {"requests": r["ok"], "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
            "p999_ms": lat.get("p999_ms"), "rps": r["rps"], "errors": r["failed"],
            "lag_p99_ms": lag.get("p99_ms"), "held_up": r.get("held_up")}


def first_line(p):
    """The first line a version command printed (nginx -v writes to stderr, haproxy -v to stdout)."""
    return (p.stderr.strip() or p.stdout.strip()).split("\n")[0]


def hold_idle(port, n):
    """Opens n idle connections through the proxy; returns them (the caller closes them)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            break
        socks.append(s)
    return socks


def latency_client(port, duration):
    """The paced latency workload through sluicegate-load (open loop: a request an earlier answer held up
    counts from when it was due, one sent on a free connection from when it was sent, so the tool's own
    timer lag, about 2 ms at the p99, is left out and reported apart; HdrHistogram percentiles), pinned to
    the client CPU; the first second warms up."""
    out = run_tool(["taskset", "-c", CLIENT_CPU, LOAD_BIN, f"127.0.0.1:{port}", "--path", "/tiny",
                    "-c", str(LAT_CONNECTIONS), "--rate", str(LAT_RATE), "--duration", f"{duration}s",
                    "--warmup", "1s", "--json"], timeout=duration + 60)
    return parsed(parse_load, out)


def run_workload(name, proxy, port, iperf_port, duration, sid, work=None):
    pin = ["taskset", "-c", CLIENT_CPU]
    url = f"http://127.0.0.1:{port}"
    # The idle workload moves no data: counting system calls there measures nothing.
    syscalls = SyscallCount(session_pids(sid), work) if sid and work and COUNT_SYSCALLS and name != "idle" \
        else None
    cpu0 = cpu_seconds(sid) if sid else None
    counters0 = machine_counters()
    # One read for the busy total and its split, so they agree to the tick.
    stat0 = read("/proc/stat")
    machine0, split0 = busy_ticks(stat0) / TICK, busy_split(stat0)
    row = {"workload": name}
    if name in ("ka", "churn", "bulk"):
        args = {"ka": ["-c64", f"{url}/tiny"], "churn": ["-c64", "-H", "Connection: close", f"{url}/tiny"],
                "bulk": ["-c16", f"{url}/1m.bin"]}[name]
        w = parsed(parse_wrk, run_tool([*pin, "wrk", "-t1", f"-d{duration}s", "--latency", "--timeout", "5s",
                                         *args], timeout=duration + 60))
        row.update(w)
        row["mb_s"] = w["bytes"] / duration / 1e6
    elif name == "lat":
        row.update(latency_client(port, duration))
    elif name == "stream":
        row.update(parsed(parse_iperf3, run_tool([*pin, "iperf3", "-c", "127.0.0.1", "-p", str(iperf_port),
                                                   "-t", str(duration), "-J"], timeout=duration + 60)))
    elif name == "idle":
        before, fds0 = (rss_kib(sid), open_fds(sid)) if sid else (None, None)
        # The same number for every proxy, within every proxy's descriptor budget.
        socks = hold_idle(port, min(IDLE_CONNECTIONS, MAXCONN - 1200))
        time.sleep(2.0)  # let the proxy accept everything and connect upstream
        after, fds1 = (rss_kib(sid), open_fds(sid)) if sid else (None, None)
        row["held"] = len(socks)
        if sid and socks:
            # Connections the proxy really holds (two descriptors each), not just queued ones.
            row["proxied"] = (fds1 - fds0) // 2
            row["rss_kib_per_conn"] = (after - before) / max(row["proxied"], 1)
        for s in socks:
            s.close()
    stat1 = read("/proc/stat")
    row["machine_cpu_s"] = busy_ticks(stat1) / TICK - machine0
    split1 = busy_split(stat1)
    row.update({f"machine_{k}_s": (split1[k] - split0[k]) / TICK for k in SPLIT})
    counters1 = machine_counters()
    row.update({k: counters1[k] - counters0[k] for k in counters0})
    if syscalls:
        row["syscalls"] = syscalls.stop()
    if sid:
        row["cpu_s"] = cpu_seconds(sid) - cpu0
        row["rss_kib"] = rss_kib(sid)
    row.update(per_unit(name, row))
    return row


def per_unit(name, row):
    """CPU per unit of work: per 100k requests (ka, churn, lat) or per GB (bulk, stream), for the
    machine (in all, and by kind: `SPLIT`) and, when measured, the proxy; the counts (the proxy's
    system calls, the machine's context switches, IPIs, interrupts and TCP segments) per request or
    per MB; nothing for a run that did no work."""
    out = {}
    kinds = [(f"machine_{k}_s", f"machine_{k}") for k in SPLIT]
    for cpu, prefix in (("machine_cpu_s", "machine"), ("cpu_s", "cpu"), *kinds):
        if row.get(cpu) is None:
            continue
        if name in ("ka", "churn", "lat") and row.get("requests"):
            out[f"{prefix}_per_100k"] = row[cpu] / row["requests"] * 1e5
        if name in ("bulk", "stream") and row.get("bytes"):
            out[f"{prefix}_per_gb"] = row[cpu] / row["bytes"] * 1e9
    for count in COUNTS:
        if row.get(count) is None:
            continue
        if name in ("ka", "churn", "lat") and row.get("requests"):
            out[f"{count}_per_req"] = row[count] / row["requests"]
        if name in ("bulk", "stream") and row.get("bytes"):
            out[f"{count}_per_mb"] = row[count] / row["bytes"] * 1e6
    return out


# The counts measured beside the times (see `per_unit`).
COUNTS = ("syscalls", "ctxt", "ipi", "irq", "segs")
# Off with --no-syscalls (where perf or its tracepoints are unavailable).
COUNT_SYSCALLS = True


def median(xs):
    """The median of the measured values (None for none): rounds on a shared machine range over a
    factor of two now and then, and one bad round must not move the figure."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def spread(xs):
    """(lowest, highest) of the measured values, or None."""
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else None


def added_by_round(rows, w, unit, added):
    """Sets `added` on every row of workload `w`: its machine CPU per unit minus the `direct` run's in
    the same round (interleaved rounds share their noise, so the difference is taken within one)."""
    direct = {r["round"]: r.get(unit) for r in rows if r["workload"] == w and r["proxy"] == "direct"}
    for r in rows:
        base = direct.get(r["round"])
        if r["workload"] == w and r["proxy"] != "direct" and base is not None and r.get(unit) is not None:
            r[added] = r[unit] - base


def ratio_by_round(rows, w, key, proxy, ref):
    """`proxy`'s `key` over `ref`'s in each round both ran: the per-round ratios, whose median and
    spread say how sure a comparison is."""
    theirs = {r["round"]: r.get(key) for r in rows if r["workload"] == w and r["proxy"] == ref}
    out = []
    for r in rows:
        t = theirs.get(r["round"])
        if r["workload"] == w and r["proxy"] == proxy and r.get(key) is not None and t:
            out.append(r[key] / t)
    return out


PEERS = ("haproxy", "haproxy-splice", "haproxy-splice-all", "haproxy-smart", "nginx")
# The targets, checked against each run: (workload, metric, kind, bound, text). CPU is compared as
# added machine CPU (machine CPU per unit minus direct's), which proxy CPU alone understates.
TARGETS = [
    ("ka", "added_per_100k", "peer", 0.7, "added machine CPU per 100k keep-alive requests ≤ 0.7 × best peer"),
    ("churn", "added_per_100k", "peer", 0.83, "added machine CPU per 100k new connections ≤ 0.83 × best peer"),
    ("bulk", "added_per_gb", "peer", 0.83, "added machine CPU per GB of 1 MiB responses ≤ 0.83 × best peer"),
    ("ka", "rps", "peer", 1.15, "keep-alive requests/s ≥ 1.15 × best peer"),
    ("stream", "gbit_s", "direct", 0.8, "one long stream ≥ 0.8 × direct"),
    ("bulk", "mb_s", "direct", 0.8, "1 MiB responses ≥ 0.8 × direct throughput"),
    ("lat", "p99_ms", "added", 0.1, "added p99 over direct ≤ 0.1 ms at 64 keep-alive connections"),
    ("idle", "rss_kib_per_conn", "abs", 16, "≤ 16 KiB RSS per idle proxied connection"),
]

# Added machine CPU per unit, by workload (computed in `report`).
ADDED = {"ka": "added_per_100k", "churn": "added_per_100k", "lat": "added_per_100k", "bulk": "added_per_gb",
         "stream": "added_per_gb"}
HEADLINE = {"ka": ("cpu_per_100k", "rps"), "lat": ("p99_ms", "rps"), "churn": ("cpu_per_100k", "rps"),
            "bulk": ("cpu_per_gb", "mb_s"), "stream": ("cpu_per_gb", "gbit_s"), "idle": ("rss_kib_per_conn", None)}


def svg_bars(title, unit, values):
    """A horizontal bar chart of {proxy: value}."""
    items = [(k, v) for k, v in values.items() if v is not None]
    if not items:
        return None
    width, row, left = 640, 24, 130
    height = 40 + row * len(items)
    top = max(v for _, v in items) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="18" font-size="13">{title} ({unit})</text>']
    for i, (k, v) in enumerate(items):
        y = 30 + i * row
        w = (width - left - 90) * v / top
        color = "#d29922" if k.startswith("sg-") else "#8b949e" if k == "direct" else "#58a6ff"
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{k}</text>')
        out.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{color}"/>')
        out.append(f'<text x="{left + w + 4:.1f}" y="{y + 15}">{v:.3g}</text>')
    out.append("</svg>")
    return "\n".join(out)


# Stage 1's gate (issue 25): the best C probe's added machine CPU against the best peer's.
GATE = [
    ("ka", "added_per_100k", "peer", 0.72, "gate: best probe's added machine CPU on keep-alive ≤ 0.72 × best peer"),
    ("churn", "added_per_100k", "peer", 0.87, "gate: best probe's added machine CPU on churn ≤ 0.87 × best peer"),
]


def targets_table(means):
    """The issue's targets against the best sluicegate variant of this run (sg-auto-log excluded: it
    does extra work the peers are not asked to do), and, when C probes ran, stage 1's gate against the
    best of them. Medians throughout."""
    out = ["## Targets", "", "| target | candidate (best variant, median) | reference | met |",
           "| --- | --- | --- | --- |"]
    probes = any(p.startswith("probe-") for m in means.values() for p in m)
    for prefix, targets in (("sg-", TARGETS), ("probe-", GATE if probes else [])):
        out += target_rows(means, prefix, targets)
    return "\n".join(out)


def target_rows(means, prefix, targets):
    out = []
    for w, key, kind, bound, text in targets:
        m = means.get(w, {})
        ours = {p: v[key] for p, v in m.items() if p.startswith(prefix) and not p.endswith("-log")
                and v.get(key) is not None}
        if not ours:
            continue
        higher_better = key in ("gbit_s", "mb_s", "rps")
        best = (max if higher_better else min)(ours, key=ours.get)
        val = ours[best]
        if kind == "peer":
            peers = {p: v[key] for p, v in m.items() if p in PEERS and v.get(key)}
            if not peers:
                continue
            ref_name = (max if higher_better else min)(peers, key=peers.get)
            ref = peers[ref_name]
            ok = val >= ref * bound if higher_better else val <= ref * bound
            ref_text = (f"{ref_name} {ref:.3g} (target {'≥' if higher_better else '≤'} {ref * bound:.3g}; "
                        f"×{val / ref:.2f})")
        elif kind == "direct":
            ref = m.get("direct", {}).get(key)
            if not ref:
                continue
            ok, ref_text = val >= ref * bound, f"direct {ref:.3g} (×{val / ref:.2f})"
        elif kind == "added":
            ref = m.get("direct", {}).get(key)
            if ref is None:
                continue
            ok, ref_text = val - ref <= bound, f"direct {ref:.3g} (added {val - ref:.3g} ms)"
        else:
            ok, ref_text = val <= bound, f"≤ {bound}"
        out.append(f"| {text} | {best} {val:.3g} {key} | {ref_text} | {'yes' if ok else 'no'} |")
    return out


def summarize(rows, meta):
    """Per workload and proxy, the median of every measured figure; sets each row's added machine CPU
    (against `direct` in its round) on the way."""
    meds = {}
    for w in meta["workloads"]:
        key, _ = HEADLINE[w]
        if w in ADDED:
            added_by_round(rows, w, "machine_per_gb" if w in ("bulk", "stream") else "machine_per_100k", ADDED[w])
        per = "per_mb" if w in ("bulk", "stream") else "per_req"
        unit = "per_gb" if w in ("bulk", "stream") else "per_100k"
        keys = ["rps", "mb_s", "gbit_s", "p50_ms", "p99_ms", key, "rss_kib", "machine_per_100k", "machine_per_gb",
                *(f"{c}_{per}" for c in COUNTS), *(f"machine_{k}_{unit}" for k in SPLIT)] \
            + ([ADDED[w]] if w in ADDED else [])
        meds[w] = {}
        for p in meta["proxies"]:
            rs = [r for r in rows if r["proxy"] == p and r["workload"] == w]
            if rs:
                meds[w][p] = {k: median([r.get(k) for r in rs]) for k in keys}
                meds[w][p]["rounds"] = len(rs)
    return meds


def best_peer(meds_w, key):
    """The peer with the lowest median `key`, or None."""
    peers = {p: m[key] for p, m in meds_w.items() if p in PEERS and m.get(key)}
    return min(peers, key=peers.get) if peers else None


def split_table(w, meds_w):
    """The markdown of where the machine's CPU went, by kind (`SPLIT`), per unit, medians: nothing for
    a workload that measures no CPU per unit (idle)."""
    unit = "per_gb" if w in ("bulk", "stream") else "per_100k"
    if not any(m.get(f"machine_user_{unit}") is not None for m in meds_w.values()):
        return []
    per = "GB" if unit == "per_gb" else "100k requests"
    md = ["", f"Machine CPU-s per {per} by kind (medians; interrupt is hard and soft interrupts, on "
          "loopback mostly the kernel's TCP receive work):", "",
          "| proxy | " + " | ".join(SPLIT) + " | all |", "| --- |" + " --- |" * (len(SPLIT) + 1)]
    for p, m in meds_w.items():
        cells = [m.get(f"machine_{k}_{unit}") for k in SPLIT] + [m.get(f"machine_{unit}")]
        md.append(f"| {p} | " + " | ".join("–" if v is None else f"{v:.3g}" for v in cells) + " |")
    return md


def workload_section(w, rows, meds_w, rounds):
    """The markdown of one workload: medians with the spread, the counters, every round."""
    fmt = lambda v, f="{:.3g}": "–" if v is None else f.format(v)  # noqa: E731
    rng = lambda sp, f="{:.3g}": "" if sp is None else f" ({f.format(sp[0])}–{f.format(sp[1])})"  # noqa: E731
    key, thr = HEADLINE[w]
    added = ADDED.get(w)
    ref = best_peer(meds_w, added) if added else None
    per = "MB" if w in ("bulk", "stream") else "request"
    unit = "per_mb" if w in ("bulk", "stream") else "per_req"
    md = [f"## {w}", "", f"Medians of {rounds} interleaved rounds, (lowest–highest) beside them. Added machine CPU: "
          f"machine CPU per unit minus `direct`'s in the same round; × {ref or 'best peer'}: the ratio taken in "
          f"each round. Counts per {per}: the proxy's system calls (perf, raw_syscalls:sys_enter), the machine's "
          f"context switches, IPIs (RES+CAL+TLB), interrupts and TCP segments sent (/proc/net/snmp OutSegs).", "",
          f"| proxy | {thr or 'value'} | p50 ms | p99 ms | {key} | added machine CPU | × {ref or 'best peer'} | "
          f"syscalls | ctxt | IPIs | irqs | TCP segs | RSS KiB |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, m in meds_w.items():
        rs = [r for r in rows if r["proxy"] == p and r["workload"] == w]
        sp = lambda k, rs=rs: spread([r.get(k) for r in rs])  # noqa: E731
        ratios = ratio_by_round(rows, w, added, p, ref) if added and ref else []
        ratio = f"{median(ratios):.2f}{rng(spread(ratios), '{:.2f}')}" if ratios else "–"
        av = m.get(added) if added else None
        md.append(f"| {p} | {fmt(m.get(thr) if thr else m.get(key))}{rng(sp(thr or key))} | {fmt(m['p50_ms'])} | "
                  f"{fmt(m['p99_ms'])} | {fmt(m[key])}{rng(sp(key))} | "
                  f"{fmt(av)}{rng(sp(added)) if av is not None else ''} | {ratio} | "
                  + " | ".join(f"{fmt(m.get(f'{c}_{unit}'))}" for c in COUNTS)
                  + f" | {fmt(m['rss_kib'], '{:.0f}')} |")
    md += split_table(w, meds_w)
    by_round = sorted({r["round"] for r in rows})
    for k in [key] + ([added] if added else []) + [f"syscalls_{unit}"]:
        md += ["", f"{k} by round:", "", "| proxy | " + " | ".join(f"round {n}" for n in by_round) + " |",
               "| --- |" + " --- |" * len(by_round)]
        for p in meds_w:
            by = {r["round"]: r.get(k) for r in rows if r["proxy"] == p and r["workload"] == w}
            md.append(f"| {p} | " + " | ".join(fmt(by.get(n)) for n in by_round) + " |")
    md += ["", "Per round:", "", "```"]
    for r in rows:
        if r["workload"] == w:
            md.append(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    return [*md, "```", ""]


def report(rows, meta, out_dir):
    stamp = meta["stamp"]
    os.makedirs(out_dir, exist_ok=True)
    meds = summarize(rows, meta)
    with open(os.path.join(out_dir, f"bench-{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = [f"# sluicegate against HAProxy, nginx and direct ({meta['date']})", "",
          f"Command: `{meta['command']}`. Machine: {meta['cpus']} CPUs, {meta['kernel']}; proxy pinned to "
          f"CPU {PROXY_CPU}, load on CPU {CLIENT_CPU}, backends unpinned; {meta['rounds']} interleaved rounds of "
          f"{meta['duration']} s per workload. Peers: {meta['versions']}.", ""]
    md += targets_table(meds), ""
    for w in meta["workloads"]:
        key, _ = HEADLINE[w]
        section = workload_section(w, rows, meds[w], meta["rounds"])
        svg = svg_bars(f"{w}: {key.replace('_', ' ')} (median)", "lower is better",
                       {p: m.get(key) for p, m in meds[w].items()})
        if svg:
            name = f"bench-{stamp}-{w}.svg"
            write(os.path.join(out_dir, name), svg)
            section.insert(2, f"![{w}]({name})\n")
        md += section
    path = os.path.join(out_dir, f"bench-{stamp}.md")
    write(path, "\n".join(md) + "\n")
    return path


def arguments(doc, proxies, workloads, duration):
    """The command line every benchmark here shares: rounds, duration, proxies, workloads, where the
    report goes, the sluicegate binary, and whether system calls are counted."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=duration)
    ap.add_argument("--proxies", default=",".join(proxies))
    ap.add_argument("--workloads", default=",".join(workloads))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--bin", default=DEFAULT_BIN)
    ap.add_argument("--no-syscalls", action="store_true",
                    help="do not count the proxy's system calls (where perf or its tracepoints are unavailable)")
    return ap


def main():
    a = arguments(__doc__, PROXIES, WORKLOADS, duration=10).parse_args()
    global COUNT_SYSCALLS
    COUNT_SYSCALLS = not a.no_syscalls
    if COUNT_SYSCALLS:
        need("perf")
    probes = probe_targets(a.proxies.split(","))
    if probes:
        subprocess.run(["make", "--quiet", "-C", PROBES, *probes], check=True)
    proxies = a.proxies.split(",")
    workloads = [w for w in WORKLOADS if w in a.workloads.split(",")]
    a.duration = max(2, min(a.duration, 120))
    need("wrk", "iperf3", "taskset", "nginx", *(["haproxy"] if any(p.startswith("haproxy") for p in proxies) else []))
    if (any(p.startswith("sg-") for p in proxies) and a.bin == DEFAULT_BIN) or "lat" in workloads:
        # Always (a no-op when up to date): a stale binary would measure old code, and the paced
        # latency workload runs sluicegate-load.
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    # 10 000 idle connections need 20 000 descriptors in the proxy: raise the limit where allowed.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 100_000), max(hard, 100_000)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    global MAXCONN
    MAXCONN = min(40_000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)
    try:
        rows = measure(proxies, workloads, a)
        peers = [["haproxy", "-v"]] * any(p.startswith("haproxy") for p in proxies) + [["nginx", "-v"]]
        versions = "; ".join(first_line(run_tool(c, timeout=10)) for c in peers)
    except ToolError as e:
        raise SystemExit(f"bench.py: {e}") from None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "stamp": time.strftime("%Y-%m-%d-%H%M"),
            "rounds": a.rounds, "duration": a.duration, "proxies": proxies, "workloads": workloads,
            "cpus": os.cpu_count(), "kernel": os.uname().release,
            "command": "python3 benchmarks/bench.py " + " ".join(sys.argv[1:]), "versions": versions}
    print(report(rows, meta, a.out))


def measure(proxies, workloads, a):
    """Every (round, proxy, workload): the rows of the report. ToolError, with every process it started
    ended, when a tool, a backend or a proxy fails."""
    work = tempfile.mkdtemp(prefix="sg-bench-")
    os.chmod(work, 0o755)  # nginx workers run as an unprivileged user and must read the files
    rows, fixture = [], None

    def start(p, rnd):
        cmd = proxy_command(p, work, a.bin)
        return Proxy(p, cmd, os.path.join(work, f"{p.replace('/', '_')}-r{rnd}.log")) if cmd else None

    def run(p, proxy):
        port = LISTEN if proxy else BACKENDS[0]
        iperf_port = IPERF_LISTEN if proxy else IPERF_BACKEND
        for w in workloads:
            if w == "idle" and not proxy:
                continue
            yield run_workload(w, p, port, iperf_port, a.duration, proxy.proc.pid if proxy else None, work)

    try:
        fixture = Fixture(work)
        interleaved(proxies, a.rounds, fixture, start, run, rows)
    finally:
        if fixture:
            fixture.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def interleaved(proxies, rounds, fixture, start, run, rows, settle=1.0):
    """Runs every proxy once per round, the order rotated by one each round, so that machine noise shows
    as spread between rounds instead of a bias for one proxy. For each (round, proxy): `start(proxy,
    round)` gives its `Proxy` (None for direct), started here and stopped after its workloads;
    `run(proxy, its Proxy)` yields one row per workload, kept in `rows` with its round and proxy once the
    fixture and the proxy are seen alive (one that died during a workload invalidates it). On any error
    the running proxy is killed and the error goes on."""
    proxy = None
    try:
        for rnd in range(1, rounds + 1):
            k = (rnd - 1) % len(proxies)
            for p in proxies[k:] + proxies[:k]:
                proxy = start(p, rnd)
                if proxy:
                    proxy.start()
                for row in run(p, proxy):
                    fixture.check()
                    if proxy:
                        proxy.check()
                    row.update({"round": rnd, "proxy": p})
                    keep_row(rows, row)
                if proxy:
                    proxy.stop()
                    proxy = None
                time.sleep(settle)
    finally:
        if proxy:
            proxy.kill()


def keep_row(rows, row):
    """Keeps a measured row, and shows it on stderr as it comes (floats to 3 places)."""
    rows.append(row)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
