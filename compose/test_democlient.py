"""Unit tests of compose/democlient.py: the checks the demo and its end-to-end tests rely on, each
shown to fail when its guarantee does not hold, and the commands' exit codes against a local fake of
sluicegate's admin API and of Prometheus (loopback, an ephemeral port).

    python3 -m unittest discover -s compose -p 'test_*.py'
"""

import contextlib
import io
import json
import os
import socket
import tempfile
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import democlient as dc


def backend(address, health="healthy", state="active", name=None, **extra):
    b = {"address": address, "health": health, "state": state, "active": 0, "total": 0, "source": "dns",
         "dns_name": None, "name": name}
    b.update(extra)
    return b


# Prometheus's GET /api/v1/targets as the demo's Prometheus answers it (captured), for its one job.
def targets(health, last_error=""):
    return {"status": "success", "data": {"activeTargets": [{
        "discoveredLabels": {"__address__": "sluicegate:9901", "__metrics_path__": "/metrics", "__scheme__": "http",
                             "__scrape_interval__": "5s", "__scrape_timeout__": "5s", "job": "sluicegate"},
        "labels": {"instance": "sluicegate:9901", "job": "sluicegate"}, "scrapePool": "sluicegate",
        "scrapeUrl": "http://sluicegate:9901/metrics", "globalUrl": "http://sluicegate:9901/metrics",
        "lastError": last_error, "lastScrape": "2026-11-23T07:06:01.972623139Z", "lastScrapeDuration": 0.004533657,
        "health": health, "scrapeInterval": "5s", "scrapeTimeout": "5s"}], "droppedTargets": []}}


class AdminApi(unittest.TestCase):
    def test_status_lines(self):
        lines = dc.status_lines([backend("172.18.0.3:5000", total=12, dns_name="backend"),
                                 backend("172.18.0.4:5000", health="unhealthy")])
        self.assertEqual(lines[0], "  172.18.0.3:5000        healthy    active    active=0    total=12     "
                                   "source=dns backend")
        self.assertTrue(lines[1].startswith("  172.18.0.4:5000        unhealthy  active"))
        self.assertTrue(lines[1].endswith("source=dns "))

    def test_only_the_demos_service_is_counted(self):
        # The demo's TLS services share the web service's backends: /backends lists each once per
        # service, and the checks count the web service's.
        bs = [backend("a", service="web"), backend("a", service="web-tls"), backend("b", service="web"),
              backend("a", service="api-tls")]
        self.assertEqual([b["address"] for b in dc.of_service(bs)], ["a", "b"])
        self.assertEqual(dc.healthy_active(dc.of_service(bs)), 2)

    def test_healthy_counts_only_healthy_and_active(self):
        bs = [backend("a"), backend("b", health="unhealthy"), backend("c", state="draining"), backend("d")]
        self.assertEqual(dc.healthy_active(bs), 2)

    def test_removed_backends_are_not_listed(self):
        bs = [backend("a", name="web-1"), backend("b", state="removed", name="gone"), backend("c", name=None)]
        self.assertEqual(len(dc.listed(bs)), 2)
        self.assertEqual(dc.names_line(bs), " web-1 ")

    def test_replacements_name_the_running_replacement_only(self):
        replaced = {"previous_container": "r-1", "reason": "exited (137)"}
        bs = [backend("a", replica={"container": "r-4", "docker_state": "running", "replaced": replaced}),
              backend("b", replica={"container": "r-5", "docker_state": "created", "replaced": replaced}),
              backend("c", replica={"container": "r-6", "docker_state": "running",
                                    "replaced": {"previous_container": "r-2", "reason": "gone"}}),
              backend("d")]
        self.assertEqual(dc.replacements(bs, "r-1"), ["r-4 replaces it: exited (137)"])
        self.assertEqual(dc.replacements(bs, "r-3"), [])

    def test_wrk_table_counts_what_happened_during_the_run(self):
        before = [backend("10.0.0.2:5000", total=100), backend("10.0.0.3:5000", total=50)]
        after = [backend("10.0.0.2:5000", total=130), backend("10.0.0.3:5000", total=60)]
        table = dc.wrk_table(before, dc.parse_requests("web-1 1000\nweb-2 10\n"),
                             dc.parse_requests("web-1 1750\nweb-2 260\n\n"), after)
        self.assertEqual(table[1], "  web-1               750  75.0 %      10.0.0.2:5000              30  75.0 %")
        self.assertEqual(table[2], "  web-2               250  25.0 %      10.0.0.3:5000              10  25.0 %")
        self.assertEqual(len(table), 3)


class Prometheus(unittest.TestCase):
    def test_target_up(self):
        self.assertEqual(dc.sluicegate_target(targets("up")), (True, "target up"))

    def test_target_down_says_why(self):
        up, seen = dc.sluicegate_target(targets("down", 'Get "http://sluicegate:9901/metrics": context '
                                                        "deadline exceeded"))
        self.assertFalse(up)
        self.assertIn("http://sluicegate:9901/metrics is down: Get", seen)

    def test_no_target_of_the_job(self):
        t = targets("up")
        t["data"]["activeTargets"][0]["labels"]["job"] = "prometheus"
        self.assertEqual(dc.sluicegate_target(t), (False, "Prometheus has no target of the job sluicegate"))

    def test_has_data(self):
        def answer(*values):
            return {"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"service": "web"}, "value": [1763881801.5, v]} for v in values]}}
        self.assertTrue(dc.has_data(answer("0.4")))
        self.assertTrue(dc.has_data(answer("0", "0.4")), "a service without traffic first")
        self.assertFalse(dc.has_data(answer("0")))
        self.assertFalse(dc.has_data(answer("0", "0")))
        self.assertFalse(dc.has_data(answer()))


# What sluicegate-load --json reports (the fields these checks read).
def load(ok, failed_at, backends=None):
    return {"requests": ok + len(failed_at), "ok": ok, "failed": len(failed_at),
            "failures": {"connect: connection refused": len(failed_at)} if failed_at else {},
            "failed_at": failed_at, "backends": backends or {}}


class Reports(unittest.TestCase):
    def test_load_summary(self):
        counts, served = dc.load_summary(load(3, [], {"web-2": {"requests": 1}, "web-1": {"requests": 2}}))
        self.assertEqual(json.loads(counts), {"requests": 3, "ok": 3, "failed": 0, "failures": {}})
        self.assertEqual(served, "served by: web-1 2, web-2 1")

    def test_failover_requests_cut_in_flight_are_allowed(self):
        self.assertEqual(dc.failover_verdict(load(470, [100.1, 100.2]), 100.5), (True, 2))

    def test_failover_a_request_due_after_the_kill_failed(self):
        self.assertEqual(dc.failover_verdict(load(470, [100.1, 100.7]), 100.5), (False, 1))

    def test_failover_nothing_served(self):
        self.assertEqual(dc.failover_verdict(load(0, []), 100.5), (False, 0))

    def routes(self, *tables, served=None):
        served = served or ["web-1"] * len(tables)
        return {f"sg-{i}": {"routes": t, "served_by": b} for i, (t, b) in enumerate(zip(tables, served, strict=True))}

    def test_replicas_agree(self):
        t = {"10.0.0.7": "web-1", "10.0.0.12": "web-2"}
        ok, lines, first = dc.agreement(self.routes(t, dict(t)))
        self.assertTrue(ok)
        self.assertEqual(first, t)
        self.assertIn("0 of 2 client addresses routed differently", lines[0])

    def test_replicas_disagree_on_a_client(self):
        ok, lines, _ = dc.agreement(self.routes({"c1": "web-1", "c2": "web-2"}, {"c1": "web-1", "c2": "web-1"}))
        self.assertFalse(ok)
        self.assertIn("1 of 2 client addresses routed differently", lines[0])

    def test_replicas_serve_one_request_differently(self):
        t = {"c1": "web-1"}
        self.assertFalse(dc.agreement(self.routes(t, dict(t), served=("web-1", "web-2")))[0])

    def test_a_client_moved_since_the_first_check(self):
        t = {"c1": "web-1", "c2": "web-2"}
        ok, lines, _ = dc.agreement(self.routes(t, dict(t)), before={"c1": "web-1", "c2": "web-3"})
        self.assertFalse(ok)
        self.assertEqual(lines[0], "clients whose backend changed since the first check: 1 of 2")

    def test_one_replica_is_not_an_agreement(self):
        with self.assertRaises(dc.Failed):
            dc.agreement(self.routes({"c1": "web-1"}))


PROC_STATUS_HARDENED = """Name:\tsluicegate
Umask:\t0022
State:\tS (sleeping)
Uid:\t65534\t65534\t65534\t65534
NoNewPrivs:\t1
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
"""
INSPECT_HARDENED = ['["no-new-privileges:true"]', '["ALL"]', "null", "268435456", "1000000000", "256"]


class Hardening(unittest.TestCase):
    def test_hardened(self):
        problems, summary = dc.hardening("demo-sg-1", INSPECT_HARDENED, PROC_STATUS_HARDENED, False)
        self.assertEqual(problems, [])
        self.assertEqual(summary, "demo-sg-1: no-new-privileges, no capability, memory 256 MiB, 1 CPUs, 256 pids")

    def test_each_gap_is_named(self):
        inspect = ['["no-new-privileges:false"]', '["NET_RAW"]', '["NET_ADMIN"]', "0", "0", "0"]
        status = PROC_STATUS_HARDENED.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0").replace(
            "CapBnd:\t0000000000000000", "CapBnd:\t00000000a80425fb")
        problems, _ = dc.hardening("c", inspect, status, False)
        self.assertEqual(problems, ["no-new-privileges", "cap_drop ALL", "no capability added back",
                                    "memory, CPU and pids limits", "NoNewPrivs in /proc", "no capability in /proc"])

    def test_swarm_is_not_asked_for_no_new_privileges(self):
        inspect = ["null", *INSPECT_HARDENED[1:]]
        status = PROC_STATUS_HARDENED.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")
        self.assertEqual(dc.hardening("t", inspect, status, True)[0], [])
        self.assertEqual(dc.hardening("t", inspect, status, False)[0], ["no-new-privileges", "NoNewPrivs in /proc"])


class RoutingLog(unittest.TestCase):
    def test_counts_routing_lines_that_name_their_backend(self):
        lines = [
            json.dumps({"target": "sluicegate::route", "backend": "10.0.0.2:5000", "backend_name": "web-1"}),
            json.dumps({"target": "sluicegate::route", "backend": "10.0.0.3:5000", "backend_name": None}),
            json.dumps({"target": "sluicegate::health", "backend_name": "web-1"}),
            "sluicegate 0.1.0 starting",
            "42",
            json.dumps({"target": "sluicegate::route", "backend_name": "web-2"}),
        ]
        self.assertEqual(dc.count_named_routes(lines), 2)


class Fake(BaseHTTPRequestHandler):
    """Answers GET PATH with the JSON the test put in `answers` (404 otherwise); `sequences` holds a
    list of answers for a path, one per request, the last one repeated."""

    answers: ClassVar[dict] = {}
    sequences: ClassVar[dict] = {}

    def do_GET(self):
        seq = self.sequences.get(self.path)
        body = (seq.pop(0) if len(seq) > 1 else seq[0]) if seq else self.answers.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        if isinstance(body, bytes):
            self.wfile.write(body)
        elif body is not None:
            self.wfile.write(json.dumps(body).encode())

    def log_message(self, *_):
        pass


class Commands(unittest.TestCase):
    """The commands' output and exit codes, over a real loopback socket."""

    def setUp(self):
        Fake.answers, Fake.sequences = {}, {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.saved = dc.ADMIN, dc.PROMETHEUS
        dc.ADMIN = dc.PROMETHEUS = url

    def tearDown(self):
        dc.ADMIN, dc.PROMETHEUS = self.saved
        self.server.shutdown()
        self.server.server_close()

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = dc.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_prometheus_up(self):
        Fake.answers["/api/v1/targets"] = targets("up")
        code, out, _ = self.run_main("prometheus-up")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("Prometheus scrapes sluicegate (target up after "), out)

    def test_prometheus_up_waits_for_the_first_scrape(self):
        Fake.sequences["/api/v1/targets"] = [targets("unknown"), targets("unknown"), targets("up")]
        code, out, _ = self.run_main("prometheus-up", "--wait", "30")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("Prometheus scrapes sluicegate (target up after "), out)
        self.assertEqual(Fake.sequences["/api/v1/targets"], [targets("up")], "asked until it was up")

    def test_prometheus_down_fails_saying_why_after_waiting(self):
        Fake.answers["/api/v1/targets"] = targets("down", "connection refused")
        code, out, err = self.run_main("prometheus-up", "--wait", "0.6")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("prometheus-up: Prometheus does not scrape sluicegate after 0.6 s: target "
                      "http://sluicegate:9901/metrics is down: connection refused", err)

    def test_prometheus_not_answering_fails(self):
        dc.PROMETHEUS = "http://127.0.0.1:" + str(refusing_port())
        code, _, err = self.run_main("prometheus-up")
        self.assertEqual(code, 1)
        self.assertIn("Prometheus does not answer", err)

    def test_healthy_and_replica_count_print_0_when_the_admin_api_does_not_answer(self):
        dc.ADMIN = "http://127.0.0.1:" + str(refusing_port())
        self.assertEqual(self.run_main("healthy")[:2], (0, "0\n"))
        self.assertEqual(self.run_main("replica-count")[:2], (0, "0\n"))

    def test_admin_api_commands(self):
        Fake.answers["/backends"] = [backend("a:1", name="web-1"), backend("b:1", health="unhealthy", name="web-2"),
                                     backend("c:1", state="removed")]
        Fake.answers["/rep"] = {"message": {"N": 4, "replicas": []}}
        self.assertEqual(self.run_main("healthy")[:2], (0, "1\n"))
        self.assertEqual(self.run_main("counts")[:2], (0, "1 2\n"))
        self.assertEqual(self.run_main("health-of", "b:1")[:2], (0, "unhealthy\n"))
        self.assertEqual(self.run_main("health-of", "z:1")[:2], (0, "absent\n"))
        self.assertEqual(self.run_main("backend-names")[:2], (0, "web-1 web-2 \n"))
        self.assertEqual(self.run_main("replica-count")[:2], (0, "4\n"))

    def test_engines_are_read_from_the_relay_info_samples(self):
        Fake.answers["/metrics"] = (
            b'# HELP sluicegate_relay_info The relay engine a service runs.\n'
            b'# TYPE sluicegate_relay_info gauge\n'
            b'sluicegate_relay_info{service="web",relay="auto",policy="least_conn"} 1\n'
            b'sluicegate_relay_info{service="db \\"x\\"",relay="ring",policy="round_robin"} 1\n'
            b'sluicegate_relay_infos{service="no",relay="copy"} 1\n'
        )
        self.assertEqual(self.run_main("engines")[:2], (0, 'db \\"x\\": ring\nweb: auto\n'))
        Fake.answers["/metrics"] = b"sluicegate_up 1\n"
        code, out, err = self.run_main("engines")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no sluicegate_relay_info", err)

    def test_status_fails_when_the_admin_api_does_not_answer(self):
        dc.ADMIN = "http://127.0.0.1:" + str(refusing_port())
        code, out, err = self.run_main("status")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("status: URLError", err)

    def test_reports_of_files(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "load.json")
            with open(path, "w") as f:
                json.dump(load(10, [5.0], {"web-1": {"requests": 10}}), f)
            code, out, _ = self.run_main("load-report", path, "--label", "load:")
            self.assertEqual(code, 0)
            self.assertTrue(out.startswith('load: {"requests": 11, "ok": 10, "failed": 1'), out)
            self.assertEqual(self.run_main("load-report", path, "--no-failures")[0], 1)
            self.assertEqual(self.run_main("failover-check", path, "4.0")[0], 1)
            code, out, _ = self.run_main("failover-check", path, "6.0")
            self.assertEqual(code, 0)
            self.assertIn("1 request(s) in flight on the killed backend were cut", out)
            routes = json.dumps({"a": {"routes": {"c": "web-1"}, "served_by": "web-1"},
                                 "b": {"routes": {"c": "web-1"}, "served_by": "web-1"}})
            saved = os.path.join(d, "routes.json")
            self.assertEqual(self.run_main("swarm-agree", routes, "save", saved)[0], 0)
            self.assertEqual(self.run_main("swarm-agree", routes, "compare", saved)[0], 0)
            with open(saved, "w") as f:
                json.dump({"c": "web-2"}, f)
            self.assertEqual(self.run_main("swarm-agree", routes, "compare", saved)[0], 1)

    def test_a_bad_command_line_exits_2(self):
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as e:
            dc.main(["spread"])
        self.assertEqual(e.exception.code, 2)


class FakeRedis:
    """A one-thread fake of a Redis server behind sluicegate (loopback, an ephemeral port): reads inline
    commands until QUIT and answers INFO with `role`, SET with +OK, or -READONLY as a replica does."""

    def __init__(self, role):
        self.role = role
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    self.answer(conn)

    def answer(self, conn):
        buf = b""
        while b"QUIT\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        for line in buf.decode().split("\r\n"):
            if line.startswith("INFO"):
                body = f"# Server\r\nrun_id:{self.role}0123\r\n# Replication\r\nrole:{self.role}\r\n"
                conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body.encode()))
            elif line.startswith("SET"):
                conn.sendall(b"+OK\r\n" if self.role == "master" else
                             b"-READONLY You can't write against a read only replica.\r\n")
            elif line == "QUIT":
                conn.sendall(b"+OK\r\n")

    def close(self):
        self.sock.close()


class Redis(unittest.TestCase):
    def run_main(self, addr, *argv):
        out = io.StringIO()
        old = dc.REDIS
        dc.REDIS = addr
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                code = dc.main(list(argv))
        finally:
            dc.REDIS = old
        return code, out.getvalue()

    def test_role_and_run_id(self):
        r = FakeRedis("master")
        self.addCleanup(r.close)
        self.assertEqual(self.run_main(r.addr, "redis-role"), (0, "master master0123\n"))

    def test_a_write_to_a_replica_fails(self):
        for role, code in (("master", 0), ("slave", 1)):
            r = FakeRedis(role)
            self.addCleanup(r.close)
            self.assertEqual(self.run_main(r.addr, "redis-set", "k", "v")[0], code, role)

    def test_nothing_listening_fails(self):
        self.assertEqual(self.run_main(f"127.0.0.1:{refusing_port()}", "redis-role")[0], 1)


def refusing_port():
    """A loopback port on which nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    unittest.main()
