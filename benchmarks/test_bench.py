"""Unit tests of bench.py's parsers (they make the published numbers) and of how it runs tools.

The fixtures in testdata/ are real outputs, captured on Debian bookworm: wrk 4.1.0, iperf3 3.12,
HAProxy 2.6, nginx 1.22, this repository's sluicegate-load, and /proc of Linux 6.18.

    python3 -m unittest discover -s benchmarks -p 'test_*.py'
"""

import os
import sys
import tempfile
import unittest

import bench

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def fixture(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


class Wrk(unittest.TestCase):
    def test_keepalive(self):
        r = bench.parse_wrk(fixture("wrk-keepalive.txt"))
        self.assertEqual(r["rps"], 54967.58)
        self.assertEqual(r["requests"], 110100)
        self.assertAlmostEqual(r["bytes"], 19.21 * 2**20)
        self.assertAlmostEqual(r["p50_ms"], 0.19)  # "190.00us"
        self.assertAlmostEqual(r["p99_ms"], 4.31)  # "4.31ms"
        self.assertEqual(r["errors"], 0)

    def test_bulk_reads_gigabytes(self):
        r = bench.parse_wrk(fixture("wrk-bulk.txt"))
        self.assertEqual(r["requests"], 2153)
        self.assertAlmostEqual(r["bytes"], 2.10 * 2**30)
        self.assertAlmostEqual(r["p50_ms"], 3.36)

    def test_churn(self):
        r = bench.parse_wrk(fixture("wrk-churn.txt"))
        self.assertEqual((r["requests"], r["rps"], r["p50_ms"]), (20905, 10404.23, 0.74))
        self.assertAlmostEqual(r["bytes"], 3.55 * 2**20)

    def test_non_2xx_answers_are_errors(self):
        self.assertEqual(bench.parse_wrk(fixture("wrk-non2xx.txt"))["errors"], 25603)

    def test_socket_errors_are_errors(self):
        r = bench.parse_wrk(fixture("wrk-socket-errors.txt"))
        self.assertEqual((r["requests"], r["errors"]), (1369, 2738))
        self.assertAlmostEqual(r["bytes"], 53.48 * 2**10)

    def test_a_run_that_completed_nothing_is_not_a_measurement(self):
        # wrk exits 0 here, with latencies of 0.
        with self.assertRaisesRegex(ValueError, "wrk completed no request"):
            bench.parse_wrk(fixture("wrk-nothing-completed.txt"))

    def test_not_a_report(self):
        with self.assertRaisesRegex(ValueError, "not a wrk report"):
            bench.parse_wrk(fixture("wrk-refused.stderr"))

    def test_durations(self):
        for text, ms in [("812.00us", 0.812), ("1.50ms", 1.5), ("2.01s", 2010.0), ("1.00m", 60000.0),
                         ("1.00h", 3600000.0)]:
            self.assertAlmostEqual(bench.wrk_duration_ms(text), ms, msg=text)
        for bad in ["", "1.5", "ms", "1.5ns", "-nan%"]:
            with self.assertRaises(ValueError, msg=bad):
                bench.wrk_duration_ms(bad)


class Iperf3(unittest.TestCase):
    def test_received(self):
        r = bench.parse_iperf3(fixture("iperf3.json"))
        self.assertEqual(r["bytes"], 2527985664)
        self.assertAlmostEqual(r["gbit_s"], 20.067997110446056)

    def test_an_error_reported_with_exit_code_0(self):
        # iperf3 3.12 -J exits 0 when it cannot connect: only the JSON says so.
        with self.assertRaisesRegex(ValueError, "iperf3: unable to connect to server: Connection refused"):
            bench.parse_iperf3(fixture("iperf3-refused.json"))


class Load(unittest.TestCase):
    def test_report(self):
        self.assertEqual(bench.parse_load(fixture("load.json")),
                         {"requests": 400, "p50_ms": 1.484, "p99_ms": 9.167, "p999_ms": 13.255,
                          "rps": 400.55900893722054, "errors": 0, "lag_p99_ms": None, "held_up": None})

    def test_open_loop_report_with_the_tools_lag(self):
        r = bench.parse_load(fixture("load-open.json"))
        # 400 requests at 400/s on 4 connections against `sluicegate-load serve`: the tool's own lag
        # (about 2 ms at the p99, tokio's timer) is reported apart, not in the latency.
        self.assertEqual((r["requests"], r["errors"]), (400, 0))
        self.assertEqual((r["p50_ms"], r["p99_ms"], r["lag_p99_ms"], r["held_up"]), (0.093, 0.27, 2.621, 0))

    def test_nothing_succeeded(self):
        r = bench.parse_load(fixture("load-refused.json"))
        self.assertEqual((r["requests"], r["errors"], r["p99_ms"]), (0, 5, None))


class Versions(unittest.TestCase):
    def test_first_line_of_stdout_or_stderr(self):
        class Done:
            def __init__(self, stdout, stderr):
                self.stdout, self.stderr = stdout, stderr

        self.assertEqual(bench.first_line(Done(fixture("haproxy-v.stdout"), "")),
                         "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/")
        self.assertEqual(bench.first_line(Done("", fixture("nginx-v.stderr"))), "nginx version: nginx/1.22.1")


class Proc(unittest.TestCase):
    def test_listening_sockets_only(self):
        text = fixture("proc-net-tcp.txt")
        self.assertTrue(bench.listens_in(text, 19001))  # 4A39: listening, and a TIME_WAIT
        self.assertTrue(bench.listens_in(text, 19002))
        self.assertFalse(bench.listens_in(text, 19003))  # 4A3B: TIME_WAIT only
        self.assertFalse(bench.listens_in(text, 19004))  # absent

    def test_stat_of_a_process_whose_name_has_spaces_and_parentheses(self):
        stat = fixture("proc-pid-stat.txt")  # comm "sg) worker (1"
        self.assertEqual(bench.stat_session(stat), 18406)
        self.assertEqual(bench.stat_cpu_ticks(stat), 3 + 0 + 5 + 0)

    def test_machine_busy_ticks(self):
        # cpu  1155487 61173 190658 132532 4273 0 18605 1034 0 0: all but idle and iowait.
        self.assertEqual(bench.busy_ticks(fixture("proc-stat.txt")), 1155487 + 61173 + 190658 + 0 + 18605 + 1034)

    def test_machine_busy_by_kind(self):
        # cpu  1155487 61173 190658 132532 4273 0 18605 1034 0 0: user with nice, system, irq with
        # softirq (interrupt), steal; together the busy ticks.
        split = bench.busy_split(fixture("proc-stat.txt"))
        self.assertEqual(split, {"user": 1155487 + 61173, "system": 190658, "interrupt": 0 + 18605, "steal": 1034})
        self.assertEqual(sum(split.values()), bench.busy_ticks(fixture("proc-stat.txt")))

    def test_rss(self):
        self.assertEqual(bench.statm_rss_kib(fixture("proc-pid-statm.txt"), page=4096), 3380 * 4)


class PerUnit(unittest.TestCase):
    def test_requests_and_bytes(self):
        self.assertEqual(bench.per_unit("ka", {"requests": 200_000, "machine_cpu_s": 4.0, "cpu_s": 1.0}),
                         {"machine_per_100k": 2.0, "cpu_per_100k": 0.5})
        self.assertEqual(bench.per_unit("stream", {"bytes": 2e9, "machine_cpu_s": 3.0}), {"machine_per_gb": 1.5})

    def test_machine_cpu_by_kind(self):
        row = {"requests": 200_000, "machine_cpu_s": 4.0, "machine_user_s": 1.0, "machine_system_s": 2.0,
               "machine_interrupt_s": 0.5, "machine_steal_s": 0.5}
        self.assertEqual(bench.per_unit("ka", row),
                         {"machine_per_100k": 2.0, "machine_user_per_100k": 0.5, "machine_system_per_100k": 1.0,
                          "machine_interrupt_per_100k": 0.25, "machine_steal_per_100k": 0.25})
        meds = {"direct": {"machine_user_per_100k": 0.5, "machine_system_per_100k": 1.0,
                           "machine_interrupt_per_100k": 0.25, "machine_steal_per_100k": 0.25,
                           "machine_per_100k": 2.0}}
        self.assertIn("| direct | 0.5 | 1 | 0.25 | 0.25 | 2 |", bench.split_table("ka", meds))
        self.assertEqual(bench.split_table("idle", {"direct": {}}), [])

    def test_no_work_no_rate(self):
        self.assertEqual(bench.per_unit("ka", {"requests": 0, "machine_cpu_s": 4.0}), {})
        self.assertEqual(bench.per_unit("idle", {"held": 10, "machine_cpu_s": 1.0, "cpu_s": 0.1}), {})


class Counters(unittest.TestCase):
    def test_context_switches(self):
        self.assertEqual(bench.ctxt_total("cpu  1 2 3 4 5 6 7 8 9 10\nintr 5 0\nctxt 123456789\nbtime 1\n"),
                         123456789)
        with self.assertRaises(ValueError):
            bench.ctxt_total("cpu  1 2 3\n")

    def test_ipis_from_real_proc_interrupts(self):
        ipi, _ = bench.interrupt_totals(fixture("proc-interrupts.txt"))
        # RES 210334 + 6810, CAL 307551 + 159096, TLB 5327 + 3334.
        self.assertEqual(ipi, 210334 + 6810 + 307551 + 159096 + 5327 + 3334)

    def test_every_per_cpu_row_counts_and_single_count_rows_do_not(self):
        text = ("           CPU0       CPU1\n"
                "  0:         10          1  IO-APIC   2-edge      timer\n"
                "LOC:        100        200   Local timer interrupts\n"
                "RES:          3          4   Rescheduling interrupts\n"
                "ERR:          7\n"
                "MIS:          0\n")
        self.assertEqual(bench.interrupt_totals(text), (7, 10 + 1 + 100 + 200 + 3 + 4))

    def test_system_calls_counted_by_perf(self):
        self.assertEqual(bench.parse_perf_count(fixture("perf-stat.csv")), 402064)

    def test_perf_that_counted_nothing_is_not_a_count(self):
        with self.assertRaisesRegex(ValueError, "perf did not count system calls"):
            bench.parse_perf_count(fixture("perf-stat-not-counted.csv"))
        with self.assertRaisesRegex(ValueError, "not a perf stat"):
            bench.parse_perf_count("Error: no permission\n")

    def test_tcp_segments_are_read_by_their_field_name(self):
        snmp = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
                "Tcp: RtoAlgorithm ActiveOpens InSegs OutSegs RetransSegs\nTcp: 1 10 500 480 3\n"
                "Udp: InDatagrams\nUdp: 7\n")
        self.assertEqual(bench.tcp_segments_out(snmp), 480)
        with self.assertRaisesRegex(ValueError, "no Tcp OutSegs"):
            bench.tcp_segments_out("Ip: Forwarding\nIp: 1\n")

    def test_counts_per_request_and_per_megabyte(self):
        self.assertEqual(bench.per_unit("ka", {"requests": 1000, "syscalls": 4000, "ctxt": 500, "ipi": 100,
                                               "irq": 200}),
                         {"syscalls_per_req": 4.0, "ctxt_per_req": 0.5, "ipi_per_req": 0.1, "irq_per_req": 0.2})
        self.assertEqual(bench.per_unit("bulk", {"bytes": 2e6, "syscalls": 300}), {"syscalls_per_mb": 150.0})


class Rounds(unittest.TestCase):
    """Medians, spreads, and comparisons taken within a round."""

    def test_median_and_spread(self):
        self.assertEqual(bench.median([5, 1, 3, None]), 3)
        self.assertEqual(bench.median([4, 1, 3, 2]), 2.5)
        self.assertIsNone(bench.median([None]))
        self.assertEqual(bench.spread([2, None, 9, 4]), (2, 9))
        self.assertIsNone(bench.spread([]))

    def rows(self):
        return [{"round": 1, "proxy": "direct", "workload": "ka", "machine_per_100k": 1.0},
                {"round": 1, "proxy": "nginx", "workload": "ka", "machine_per_100k": 3.0},
                {"round": 1, "proxy": "sg-auto", "workload": "ka", "machine_per_100k": 2.0},
                {"round": 2, "proxy": "direct", "workload": "ka", "machine_per_100k": 2.0},
                {"round": 2, "proxy": "nginx", "workload": "ka", "machine_per_100k": 6.0},
                {"round": 2, "proxy": "sg-auto", "workload": "ka", "machine_per_100k": 5.0},
                # A round where direct did not run: no added figure.
                {"round": 3, "proxy": "nginx", "workload": "ka", "machine_per_100k": 9.0}]

    def test_added_is_taken_against_direct_in_the_same_round(self):
        rows = self.rows()
        bench.added_by_round(rows, "ka", "machine_per_100k", "added_per_100k")
        self.assertEqual([r.get("added_per_100k") for r in rows], [None, 2.0, 1.0, None, 4.0, 3.0, None])

    def test_ratios_are_taken_within_rounds(self):
        rows = self.rows()
        bench.added_by_round(rows, "ka", "machine_per_100k", "added_per_100k")
        self.assertEqual(bench.ratio_by_round(rows, "ka", "added_per_100k", "sg-auto", "nginx"), [0.5, 0.75])

    def test_gate_judges_the_best_probe_by_its_median(self):
        means = {"ka": {"nginx": {"added_per_100k": 2.0}, "probe-base": {"added_per_100k": 1.6},
                        "probe-ms": {"added_per_100k": 1.4}}}
        table = bench.targets_table(means)
        self.assertIn("| gate: best probe's added machine CPU on keep-alive ≤ 0.72 × best peer | probe-ms 1.4 "
                      "added_per_100k | nginx 2 (target ≤ 1.44; ×0.70) | yes |", table)

    def test_the_gate_is_for_the_ring_probes_only(self):
        means = {"ka": {"nginx": {"added_per_100k": 2.0}, "probe-ms": {"added_per_100k": 1.6},
                        "eprobe-base": {"added_per_100k": 1.0}}}
        self.assertIn("| probe-ms 1.6 added_per_100k |", bench.targets_table(means))


class ProxyCommand(unittest.TestCase):
    def test_each_probe_runs_its_own_binary_with_its_levers(self):
        with tempfile.TemporaryDirectory() as work:
            ring = bench.proxy_command("probe-ms+reg", work, None)
            epoll = bench.proxy_command("eprobe-base+thread", work, None)
        self.assertEqual(ring[:3], [bench.PROBE_BIN, "--levers", "ms+reg"])
        self.assertEqual(epoll[:3], [bench.EPOLL_PROBE_BIN, "--levers", "base+thread"])
        self.assertEqual(ring[3:], epoll[3:])

    def test_only_the_probes_a_run_names_are_built(self):
        self.assertEqual(bench.probe_targets(["nginx", "eprobe-base"]), ["epoll-proxy"])
        self.assertEqual(bench.probe_targets(["probe-ms", "eprobe-thread"]), ["ring-proxy", "epoll-proxy"])
        self.assertEqual(bench.probe_targets(["sg-auto", "haproxy"]), [])


class Tools(unittest.TestCase):
    """run_tool and parsed on real processes."""

    def test_output_of_a_tool_that_succeeds(self):
        p = bench.run_tool([sys.executable, "-c", "print('ok')"], timeout=30)
        self.assertEqual(p.stdout, "ok\n")

    def test_a_failing_tool_stops_the_run_with_its_stderr(self):
        with self.assertRaises(bench.ToolError) as e:
            bench.run_tool([sys.executable, "-c", "import sys; print('partial'); sys.exit('no backend answers')"],
                           timeout=30)
        self.assertIn("exited with 1: no backend answers", str(e.exception))

    def test_stdout_when_stderr_is_empty(self):
        with self.assertRaisesRegex(bench.ToolError, "exited with 2: .*unable to connect"):
            bench.run_tool([sys.executable, "-c", "import sys; print('{\"error\": \"unable to connect\"}'); "
                                                  "sys.exit(2)"], timeout=30)

    def test_a_tool_that_does_not_end(self):
        with self.assertRaisesRegex(bench.ToolError, "still running after 0.5 s"):
            bench.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)

    def test_a_tool_that_is_not_there(self):
        with self.assertRaisesRegex(bench.ToolError, "no-such-tool-here"):
            bench.run_tool(["no-such-tool-here"], timeout=5)

    def test_output_that_does_not_parse_names_the_tool(self):
        p = bench.run_tool([sys.executable, "-c", "print('garbage')"], timeout=30)
        with self.assertRaises(bench.ToolError) as e:
            bench.parsed(bench.parse_wrk, p)
        self.assertTrue(str(e.exception).startswith(sys.executable), e.exception)
        self.assertIn(": not a wrk report: 'garbage'", str(e.exception))


class PeerConfigs(unittest.TestCase):
    """The peers' configurations as bench.py writes them."""

    def haproxy_cfg(self, name):
        import tempfile
        with tempfile.TemporaryDirectory() as work:
            cmd = bench.proxy_command(name, work, "")
            with open(cmd[-1]) as f:
                return f.read()

    def test_only_haproxy_smart_sends_the_handshakes_ack_with_the_first_bytes(self):
        self.assertIn("option tcp-smart-connect\n", self.haproxy_cfg("haproxy-smart"))
        self.assertNotIn("tcp-smart-connect", self.haproxy_cfg("haproxy"))
        self.assertIn("haproxy-smart", bench.PEERS)


if __name__ == "__main__":
    unittest.main()
