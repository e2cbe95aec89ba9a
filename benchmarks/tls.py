#!/usr/bin/env python3
"""TLS side by side: sluicegate, HAProxy and nginx `stream` terminating TLS, and sluicegate routing by
SNI in passthrough against a plain relay of the same TLS.

Usage (from the repository root; needs wrk, haproxy, nginx with the stream module, openssl, taskset,
unshare):
    python3 benchmarks/tls.py [--rounds 6] [--duration 5] [--out benchmarks/results]

Certificates: a CA and two EC P-256 server certificates made here with openssl (bench.test for the
terminating proxies, pass.bench.test for the TLS backends). Clients connect by name: wrk runs in a
mount namespace of its own whose /etc/hosts maps both names to 127.0.0.1 (the machine's /etc/hosts is
not touched), so each ClientHello carries a real server name.

Backends: bench.py's three nginx on 127.0.0.1:19001-19003 (plain HTTP) and three nginx on 19011-19013
serving the same over TLS (pass.bench.test). Every proxy listens on 127.0.0.1:18443, pinned to CPU 1;
wrk on CPU 0. Proxies:
    direct-tls      no proxy: wrk to one TLS backend (the baseline of added machine CPU)
    sg-term         sluicegate `tls` (rustls, ring), relaying plaintext to the plain backends
    haproxy-term    HAProxy `bind ... ssl crt` in `mode tcp`, one thread (OpenSSL)
    nginx-term      nginx `stream` `listen ... ssl`, one worker (OpenSSL)
    sg-sni          sluicegate: pass.bench.test routed by SNI (another name and a default beside it)
                    to the TLS backends, TLS passed through
    sg-plain        sluicegate: one plain service in front of the same TLS backends (no hello read)
    haproxy-sni     HAProxy `req.ssl_sni` in `mode tcp`
    nginx-preread   nginx `ssl_preread` and a map on `$ssl_preread_server_name`
Workloads (the terminating proxies and direct-tls: handshake, tls-bulk; the passthrough proxies and
direct-tls: pass-ka, pass-bulk):
    handshake   wrk -c64 with `Connection: close`: a full TLS 1.3 handshake (ECDSA P-256, X25519; wrk
                resumes no session) and one 16-byte request per connection; handshakes per proxy CPU
                second
    tls-bulk    wrk -c16 GET /1m.bin over TLS, kept alive; added machine CPU per GB
    pass-ka     wrk -c64 GET /tiny over TLS to the TLS backends, kept alive; CPU per 100k requests
    pass-bulk   wrk -c16 GET /1m.bin over TLS to the TLS backends; CPU per GB
Rounds interleave every proxy (the order rotated each round). Each row records the proxy's CPU
(/proc, its session), the machine's busy CPU and its context switches and interrupts (/proc/stat).
The report gives medians over the rounds with their range, and the issue's TLS goals met or not.
Loopback only; every workload is bounded in time.
"""
import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # the shared harness: tools, /proc readings, wrk's parser, the backends

LISTEN = 18443
TLS_BACKENDS = [19011, 19012, 19013]
PROXIES = ["direct-tls", "sg-term", "haproxy-term", "nginx-term", "sg-sni", "sg-plain", "haproxy-sni",
           "nginx-preread"]
TERMINATING = ("direct-tls", "sg-term", "haproxy-term", "nginx-term")
PASSING = ("direct-tls", "sg-sni", "sg-plain", "haproxy-sni", "nginx-preread")
WORKLOADS = {"handshake": TERMINATING, "tls-bulk": TERMINATING, "pass-ka": PASSING, "pass-bulk": PASSING}


def openssl(d, *args):
    p = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise bench.ToolError(f"openssl {' '.join(args)} exited with {p.returncode}: {bench.tail(p.stderr)}")


def make_certs(d):
    """A CA and the two server certificates, EC P-256; also a combined PEM for HAProxy."""
    key = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl(d, *key, "-out", "ca.key")
    openssl(d, "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=bench CA")
    for name in ("bench.test", "pass.bench.test"):
        openssl(d, *key, "-out", f"{name}.key")
        openssl(d, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        bench.write(os.path.join(d, f"{name}.ext"), f"subjectAltName=DNS:{name}\n")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
        bench.write(os.path.join(d, f"{name}.combined"),
                    bench.read(os.path.join(d, f"{name}.pem")) + bench.read(os.path.join(d, f"{name}.key")))


class TlsBackends(bench.Fixture):
    """bench.py's plain backends, and three nginx serving the same files over TLS."""

    def __init__(self, work, certs):
        super().__init__(work)
        www = os.path.join(work, "www")
        for port in TLS_BACKENDS:
            d = os.path.join(work, f"t{port}")
            os.makedirs(d)
            conf = os.path.join(d, "nginx.conf")
            bench.write(conf, f"""worker_processes 1; daemon off; pid {d}/pid; error_log {d}/error.log;
worker_rlimit_nofile 30000;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port} ssl reuseport backlog=4096;
    ssl_certificate {certs}/pass.bench.test.pem; ssl_certificate_key {certs}/pass.bench.test.key;
    ssl_protocols TLSv1.3;
    location = /tiny {{ return 200 "0123456789abcde\\n"; }}
    location / {{ root {www}; }} }} }}
""")
            self.start(["nginx", "-c", conf, "-p", d], port, os.path.join(d, "error.log"))


def sluicegate_config(name, certs):
    plain = [f"127.0.0.1:{b}" for b in bench.BACKENDS]
    tls = [f"127.0.0.1:{b}" for b in TLS_BACKENDS]
    lines = ["log: {level: warn}", "shutdown: {drain_timeout: 1s}", "services:"]

    def service(svc, extra, backends):
        out = [f"  - name: {svc}", f"    listen: 127.0.0.1:{LISTEN}", "    balance: round_robin",
               "    relay: auto", "    max_connections: 100000"] + [f"    {e}" for e in extra] + ["    backends:"]
        return out + [f"      - {{address: \"{b}\"}}" for b in backends]

    if name == "sg-term":
        lines += service("term", [f"tls: {{cert: {certs}/bench.test.pem, key: {certs}/bench.test.key}}"], plain)
    elif name == "sg-sni":
        lines += service("pass", ["sni: [pass.bench.test]"], tls)
        lines += service("other", ["sni: [\"*.other.test\"]"], tls)
        lines += service("default", [], tls)
    else:  # sg-plain
        lines += service("plain", [], tls)
    return "\n".join(lines) + "\n"


def haproxy_config(name, certs):
    servers = bench.BACKENDS if name == "haproxy-term" else TLS_BACKENDS
    srv = "".join(f"  server b{b} 127.0.0.1:{b}\n" for b in servers)
    if name == "haproxy-term":
        front = f"  bind 127.0.0.1:{LISTEN} ssl crt {certs}/bench.test.combined ssl-min-ver TLSv1.3\n"
    else:
        front = (f"  bind 127.0.0.1:{LISTEN}\n  tcp-request inspect-delay 5s\n"
                 "  tcp-request content accept if { req_ssl_hello_type 1 }\n"
                 "  use_backend b if { req_ssl_sni -i pass.bench.test }\n")
    return f"""global
  nbthread 1
  maxconn {bench.MAXCONN}
defaults
  mode tcp
  timeout connect 5s
  timeout client 1m
  timeout server 1m
frontend f
{front}  default_backend b
backend b
  balance roundrobin
{srv}"""


def nginx_config(name, certs, d):
    module = "/usr/lib/nginx/modules/ngx_stream_module.so"
    load = f"load_module {module};\n" if os.path.exists(module) else ""
    servers = bench.BACKENDS if name == "nginx-term" else TLS_BACKENDS
    ups = "".join(f"    server 127.0.0.1:{b};\n" for b in servers)
    if name == "nginx-term":
        server = (f"  server {{ listen 127.0.0.1:{LISTEN} ssl backlog=4096; ssl_protocols TLSv1.3;\n"
                  f"    ssl_certificate {certs}/bench.test.pem; ssl_certificate_key {certs}/bench.test.key;\n"
                  "    proxy_pass up; }\n")
    else:
        server = ("  map $ssl_preread_server_name $to { pass.bench.test up; default up; }\n"
                  f"  server {{ listen 127.0.0.1:{LISTEN} backlog=4096; ssl_preread on; proxy_pass $to; }}\n")
    return f"""{load}worker_processes 1; daemon off; pid {d}/pid; error_log {d}/error.log;
events {{ worker_connections {bench.MAXCONN}; }}
stream {{
  upstream up {{
{ups}  }}
{server}}}
"""


def proxy_command(name, work, certs, binary):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    if name.startswith("sg-"):
        cfg = os.path.join(d, "sg.yaml")
        bench.write(cfg, sluicegate_config(name, certs))
        return [binary, "--config", cfg]
    if name.startswith("haproxy"):
        cfg = os.path.join(d, "haproxy.cfg")
        bench.write(cfg, haproxy_config(name, certs))
        return ["haproxy", "-db", "-f", cfg]
    if name.startswith("nginx"):
        cfg = os.path.join(d, "nginx.conf")
        bench.write(cfg, nginx_config(name, certs, d))
        return ["nginx", "-c", cfg, "-p", d]
    return None


class Proxy(bench.Proxy):
    """bench.py's proxy under test, listening on the TLS port only."""

    def start(self):
        with open(self.log, "a") as out:
            for _ in range(3):
                self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out, start_new_session=True)
                try:
                    bench.wait_port(LISTEN, self.proc)
                    return
                except (bench.ToolError, RuntimeError):
                    self.kill()
                    time.sleep(3)
        raise bench.ToolError(f"{self.name} did not start: {bench.read_log(self.log)}")


def ctxt_intr(proc_stat):
    """Context switches and interrupts since boot, from /proc/stat's `ctxt` and `intr` lines."""
    ctxt = intr = None
    for line in proc_stat.splitlines():
        if line.startswith("ctxt "):
            ctxt = int(line.split()[1])
        elif line.startswith("intr "):
            intr = int(line.split()[1])
    if ctxt is None or intr is None:
        raise ValueError("no ctxt or intr line in /proc/stat")
    return ctxt, intr


def wrk(hosts, workload, port, name, duration):
    """wrk in a mount namespace whose /etc/hosts names 127.0.0.1 (so the hello carries the name)."""
    url = f"https://{name}:{port}"
    args = {"handshake": ["-c64", "-H", "Connection: close", f"{url}/tiny"],
            "tls-bulk": ["-c16", f"{url}/1m.bin"], "pass-ka": ["-c64", f"{url}/tiny"],
            "pass-bulk": ["-c16", f"{url}/1m.bin"]}[workload]
    cmd = ["wrk", "-t1", f"-d{duration}s", "--latency", "--timeout", "5s", *args]
    inner = f"mount --bind {hosts} /etc/hosts && exec taskset -c {bench.CLIENT_CPU} " + " ".join(
        f"'{a}'" for a in cmd)
    p = bench.run_tool(["unshare", "-m", "sh", "-c", inner], timeout=duration + 60)
    return bench.parsed(bench.parse_wrk, p)


def run(workload, proxy, hosts, duration, sid):
    port = LISTEN if proxy != "direct-tls" else TLS_BACKENDS[0]
    name = "bench.test" if workload in ("handshake", "tls-bulk") and proxy != "direct-tls" else "pass.bench.test"
    cpu0 = bench.cpu_seconds(sid) if sid else None
    m0, (c0, i0) = bench.machine_busy_seconds(), ctxt_intr(bench.read("/proc/stat"))
    row = {"workload": workload, "proxy": proxy, **wrk(hosts, workload, port, name, duration)}
    c1, i1 = ctxt_intr(bench.read("/proc/stat"))
    row.update(machine_cpu_s=bench.machine_busy_seconds() - m0, ctxt=c1 - c0, intr=i1 - i0)
    if sid:
        row["cpu_s"] = bench.cpu_seconds(sid) - cpu0
    return row


def measure(a):
    work = tempfile.mkdtemp(prefix="sg-tls-bench-")
    os.chmod(work, 0o755)
    certs = os.path.join(work, "certs")
    os.makedirs(certs)
    make_certs(certs)
    hosts = os.path.join(work, "hosts")
    bench.write(hosts, "127.0.0.1 localhost bench.test pass.bench.test\n")
    rows, fixture, proxy = [], None, None
    try:
        fixture = TlsBackends(work, certs)
        for rnd in range(1, a.rounds + 1):
            order = a.proxies[rnd - 1:] + a.proxies[:rnd - 1]
            for p in order:
                cmd = proxy_command(p, work, certs, a.bin)
                proxy = Proxy(p, cmd, os.path.join(work, f"{p}-r{rnd}.log")) if cmd else None
                if proxy:
                    proxy.start()
                for w, who in WORKLOADS.items():
                    if p not in who:
                        continue
                    row = run(w, p, hosts, a.duration, proxy.proc.pid if proxy else None)
                    fixture.check()
                    if proxy:
                        proxy.check()
                    row["round"] = rnd
                    bench.keep_row(rows, row)
                if proxy:
                    proxy.stop()
                    proxy = None
                time.sleep(1)
    finally:
        if proxy:
            proxy.kill()
        if fixture:
            fixture.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def unit(row):
    """The unit of a row's work: GB for the bulk workloads, 100k requests otherwise."""
    if row["workload"].endswith("bulk"):
        return row["bytes"] / 1e9, "GB"
    return row["requests"] / 1e5, "100k"


def summarise(rows):
    """Per (workload, proxy): medians over the rounds (with min and max) of the figures compared."""
    direct = {(r["round"], r["workload"]): r for r in rows if r["proxy"] == "direct-tls"}
    out = {}
    for r in rows:
        u, _ = unit(r)
        d = direct.get((r["round"], r["workload"]))
        fig = {"rps": r["rps"], "machine_per_unit": r["machine_cpu_s"] / u,
               "ctxt_per_req": r["ctxt"] / r["requests"], "intr_per_req": r["intr"] / r["requests"]}
        if d:
            du, _ = unit(d)
            fig["added_per_unit"] = r["machine_cpu_s"] / u - d["machine_cpu_s"] / du
        if "cpu_s" in r:
            fig["cpu_per_unit"] = r["cpu_s"] / u
            if r["workload"] == "handshake" and r["cpu_s"] > 0:
                fig["handshakes_per_cpu_s"] = r["requests"] / r["cpu_s"]
        out.setdefault((r["workload"], r["proxy"]), []).append(fig)
    return {k: {f: (statistics.median([v[f] for v in vs if f in v]), min(v[f] for v in vs if f in v),
                    max(v[f] for v in vs if f in v)) for f in vs[0]} for k, vs in out.items()}


def goals(s):
    """The issue's TLS goals against this run: (text, value, bound, met)."""
    def med(w, p, f):
        return s.get((w, p), {}).get(f, (None,))[0]

    peers_hs = [med("handshake", p, "handshakes_per_cpu_s") for p in ("haproxy-term", "nginx-term")]
    best_hs = max([x for x in peers_hs if x], default=None)
    sg_hs = med("handshake", "sg-term", "handshakes_per_cpu_s")
    peers_bulk = [med("tls-bulk", p, "added_per_unit") for p in ("haproxy-term", "nginx-term")]
    best_bulk = min([x for x in peers_bulk if x is not None], default=None)
    sg_bulk = med("tls-bulk", "sg-term", "added_per_unit")
    ka = (med("pass-ka", "sg-sni", "cpu_per_unit"), med("pass-ka", "sg-plain", "cpu_per_unit"))
    gb = (med("pass-bulk", "sg-sni", "added_per_unit"), med("pass-bulk", "sg-plain", "added_per_unit"))

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = []
    r = ratio(sg_hs, best_hs)
    out.append(("full TLS 1.3 handshakes per proxy CPU-second ≥ 1.2 × the best peer's", r, 1.2,
                r is not None and r >= 1.2))
    r = ratio(sg_bulk, best_bulk)
    out.append(("added machine CPU per GB through termination ≤ the best peer's", r, 1.0, r is not None and r <= 1.0))
    r = ratio(*ka)
    out.append(("SNI passthrough proxy CPU per keep-alive request ≤ 1.05 × a plain relay's", r, 1.05,
                r is not None and r <= 1.05))
    r = ratio(*gb)
    out.append(("SNI passthrough added machine CPU per GB ≈ a plain relay's (≤ 1.05 ×)", r, 1.05,
                r is not None and r <= 1.05))
    return out


def report(rows, meta, out_dir):
    s = summarise(rows)
    stamp = meta["stamp"]
    lines = [f"# TLS: sluicegate, HAProxy and nginx ({meta['date']})", "",
             f"`{meta['command']}`: {meta['rounds']} interleaved rounds of {meta['duration']} s, the proxy on "
             f"CPU 1, wrk on CPU 0; {meta['cpus']} CPUs, kernel {meta['kernel']}; {meta['versions']}.", "",
             "Medians over the rounds (min–max). *added* = machine CPU per unit minus the same round's "
             "`direct-tls` run (wrk straight to a TLS backend); units: per 100k requests, per GB for bulk.", "",
             "## Goals", "", "| goal | sluicegate / reference | bound | met |", "| --- | ---: | ---: | --- |"]
    for text, v, bound, met in goals(s):
        lines.append(f"| {text} | {'–' if v is None else f'{v:.2f}'} | {bound} | {'yes' if met else 'no'} |")
    fields = [("rps", "req/s", "{:.0f}"), ("handshakes_per_cpu_s", "handshakes per proxy CPU-s", "{:.0f}"),
              ("cpu_per_unit", "proxy CPU per unit", "{:.3f}"), ("added_per_unit", "added machine CPU per unit",
              "{:.3f}"), ("ctxt_per_req", "ctxt/req", "{:.2f}"), ("intr_per_req", "intr/req", "{:.2f}")]
    for w in WORKLOADS:
        lines += ["", f"## {w}", "", "| proxy | " + " | ".join(h for _, h, _ in fields) + " |",
                  "| --- |" + " ---: |" * len(fields)]
        for p in meta["proxies"]:
            f = s.get((w, p))
            if not f:
                continue
            cells = []
            for key, _, fmt in fields:
                if key in f:
                    m, lo, hi = f[key]
                    cells.append(f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})")
                else:
                    cells.append("–")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    bench.write(os.path.join(out_dir, f"tls-{stamp}.md"), text)
    bench.write(os.path.join(out_dir, f"tls-{stamp}.json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--out", default=os.path.join(bench.ROOT, "benchmarks", "results"))
    ap.add_argument("--bin", default=bench.DEFAULT_BIN)
    a = ap.parse_args()
    a.proxies = [p for p in a.proxies.split(",") if p in PROXIES]
    a.duration = max(2, min(a.duration, 60))
    bench.need("wrk", "taskset", "nginx", "haproxy", "openssl", "unshare")
    if a.bin == bench.DEFAULT_BIN:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "sluicegate"], cwd=bench.ROOT, check=True)
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Every proxy's connection cap within the descriptors it may have (two per connection).
    bench.MAXCONN = min(40_000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)
    try:
        rows = measure(a)
        versions = "; ".join(bench.first_line(bench.run_tool(c, timeout=10))
                             for c in (["haproxy", "-v"], ["nginx", "-v"], ["openssl", "version"]))
    except bench.ToolError as e:
        raise SystemExit(f"tls.py: {e}") from None
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "stamp": time.strftime("%Y-%m-%d-%H%M"),
            "rounds": a.rounds, "duration": a.duration, "proxies": a.proxies, "cpus": os.cpu_count(),
            "kernel": os.uname().release, "versions": versions,
            "command": "python3 benchmarks/tls.py " + " ".join(sys.argv[1:])}
    print(report(rows, meta, a.out))


if __name__ == "__main__":
    main()
