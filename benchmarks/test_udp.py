"""Unit tests of udp.py's parsers and of how it turns rounds into the goals' verdicts (they make the
published numbers). No tool is run: the fixtures in testdata/ are real outputs, captured on Debian
bookworm: dnsperf 2.10.0 against knotd 3.2.6, and /proc of Linux 6.18.

    python3 -m unittest discover -s benchmarks -p 'test_*.py'
"""

import unittest

from test_bench import fixture

import udp


class Dnsperf(unittest.TestCase):
    def test_saturation_report(self):
        r = udp.parse_dnsperf(fixture("dnsperf.txt"))
        self.assertEqual((r["sent"], r["completed"], r["lost"]), (190668, 190668, 0))
        self.assertAlmostEqual(r["qps"], 95130.848074)
        self.assertAlmostEqual(r["avg_latency_s"], 0.000669)

    def test_nothing_answered_is_not_a_measurement(self):
        # dnsperf exits 0 here, every query timed out.
        with self.assertRaisesRegex(ValueError, "completed no query"):
            udp.parse_dnsperf(fixture("dnsperf-nothing.txt"))

    def test_not_a_report(self):
        with self.assertRaisesRegex(ValueError, "not a dnsperf report"):
            udp.parse_dnsperf("dnsperf: invalid argument\n")

    def test_verbose_latencies(self):
        out = fixture("dnsperf-verbose.txt")
        lats = udp.dnsperf_latencies(out)
        # One latency per answer; the statistics' own lines ("Average Latency (s): ...") are not answers.
        self.assertEqual(len(lats), udp.parse_dnsperf(out)["completed"])
        self.assertTrue(all(0 < x < 1 for x in lats))
        self.assertEqual(lats[0], 0.000091)


class Percentile(unittest.TestCase):
    def test_nearest_rank(self):
        xs = list(range(1, 101))
        self.assertEqual(udp.percentile(xs, 50), 50)
        self.assertEqual(udp.percentile(xs, 99), 99)
        self.assertEqual(udp.percentile(xs, 99.9), 100)
        self.assertEqual(udp.percentile([7], 99), 7)
        self.assertIsNone(udp.percentile([], 99))

    def test_unsorted_input(self):
        self.assertEqual(udp.percentile([3, 1, 2], 50), 2)


class Proc(unittest.TestCase):
    def test_bound_means_bound_and_not_connected(self):
        text = fixture("proc-net-udp.txt")
        self.assertTrue(udp.udp_bound_in(text, 19053))
        # 18054 is bound too, but connected (a session's socket, not a listener).
        self.assertFalse(udp.udp_bound_in(text, 18054))
        self.assertFalse(udp.udp_bound_in(text, 19054))

    def test_slab_bytes(self):
        text = fixture("slabinfo.txt")
        self.assertEqual(udp.slab_bytes(text, ("UDP",)), 61 * 1344)
        self.assertEqual(udp.slab_bytes(text, ("UDP", "filp")), 61 * 1344 + 1061 * 192)
        # TCP and kmalloc are not a UDP socket's.
        self.assertEqual(udp.slab_bytes(text), 61 * 1344 + 282 * 128 + 205 * 832 + 1061 * 192 + 79126 * 192)

    def test_udp_drops(self):
        d = udp.udp_drops(fixture("proc-net-snmp-udp.txt"))
        self.assertEqual(d, {"rcvbuf": 43016, "sndbuf": 0, "in_errors": 43016})

    def test_udp_drops_needs_the_udp_lines(self):
        with self.assertRaisesRegex(ValueError, "no Udp"):
            udp.udp_drops(fixture("proc-net-snmp-udp.txt").replace("Udp:", "Xdp:"))

    def test_status_context_switches(self):
        self.assertEqual(udp.status_ctxt(fixture("proc-pid-status.txt")), 325 + 21)


class Blast(unittest.TestCase):
    def test_lines(self):
        out = '{"phase": "held", "sockets": 3}\n{"phase": "passes", "sent": 6, "received": 5, "lost": 1}\n'
        self.assertEqual([r["phase"] for r in udp.parse_blast(out)], ["held", "passes"])

    def test_nothing(self):
        with self.assertRaisesRegex(ValueError, "printed nothing"):
            udp.parse_blast("")


def row(rnd, proxy, workload, **kw):
    return {"round": rnd, "proxy": proxy, "workload": workload, **kw}


class Goals(unittest.TestCase):
    def rows(self):
        rows = []
        for rnd, (d, s, n) in enumerate([(2.0, 3.0, 6.0), (2.5, 3.0, 7.5), (1.0, 4.0, 4.0)], 1):
            rows += [row(rnd, "direct", "dns", machine_per_100k=d, qps=100e3),
                     row(rnd, "sluicegate", "dns", machine_per_100k=s, qps=60e3),
                     row(rnd, "nginx", "dns", machine_per_100k=n, qps=40e3),
                     row(rnd, "direct", "dns-paced", p99_us=100.0),
                     row(rnd, "sluicegate", "dns-paced", p99_us=100.0 + 50 * rnd),
                     row(rnd, "sluicegate", "hold-100", cpu_us_per_dgram=2.0),
                     row(rnd, "sluicegate", "hold", cpu_us_per_dgram=2.0 + 0.2 * rnd, rss_bytes_per_session=900.0)]
        udp.derive(rows)
        return rows

    def test_added_is_taken_within_a_round(self):
        rows = self.rows()
        added = [r["added_per_100k"] for r in rows if r["workload"] == "dns" and r["proxy"] == "sluicegate"]
        self.assertEqual(added, [1.0, 0.5, 3.0])
        self.assertEqual([r["added_p99_us"] for r in rows if r["proxy"] == "sluicegate"
                          and r["workload"] == "dns-paced"], [50.0, 100.0, 150.0])
        self.assertEqual([round(r["cpu_vs_100"], 2) for r in rows if r["workload"] == "hold"], [1.1, 1.2, 1.3])

    def test_verdicts(self):
        v = {text: ok for text, _, ok in udp.goals(self.rows())}
        # Added CPU: 1/4, 0.5/5.5, 3/3 by round: median 0.25 ≤ 0.6.
        self.assertTrue(v["DNS: added machine CPU per 100k queries ≤ 0.6 × nginx's"])
        # 60k against 40k: 1.5 ≥ 1.3.
        self.assertTrue(v["DNS: queries/s at saturation ≥ 1.3 × nginx's"])
        # Added p99 50, 100, 150: the median 100 is within 100 µs.
        self.assertTrue(v["DNS: added p99 ≤ 100 µs at 20k queries/s"])
        self.assertFalse(v["open sessions: proxy CPU per datagram no higher than with 100"])
        self.assertTrue(v["open sessions: RSS growth per session ≤ 1 KiB"])
        # Nothing measured: no verdict.
        self.assertIsNone(v["1,200-byte streams: proxy system calls per datagram ≤ 0.25"])

    def test_an_added_figure_below_zero_in_a_round_gives_no_verdict(self):
        rows = self.rows()
        # Round 2's direct run was slower than the proxy's: its added p99 is negative.
        for r in rows:
            if r["round"] == 2 and r["workload"] == "dns-paced" and r["proxy"] == "direct":
                r["p99_us"] = 400.0
        udp.derive(rows)
        figures = {text: (fig, ok) for text, fig, ok in udp.goals(rows)}
        fig, ok = figures["DNS: added p99 ≤ 100 µs at 20k queries/s"]
        self.assertIsNone(ok)
        self.assertIn("no verdict", fig)
        # The other goals keep theirs.
        self.assertTrue(figures["DNS: queries/s at saturation ≥ 1.3 × nginx's"][1])

    def test_a_peer_below_zero_in_a_round_gives_no_ratio_verdict(self):
        rows = self.rows()
        # Round 1's direct DNS run cost more than nginx's: nginx's added CPU is negative, and a ratio
        # to it would be negative too (and pass "≤ 0.6").
        for r in rows:
            if r["round"] == 1 and r["workload"] == "dns" and r["proxy"] == "nginx":
                r["machine_per_100k"] = 1.5
        udp.derive(rows)
        ours = [r["added_per_100k"] for r in rows if r["workload"] == "dns" and r["proxy"] == "sluicegate"]
        self.assertGreaterEqual(min(ours), 0)
        figures = {text: (fig, ok) for text, fig, ok in udp.goals(rows)}
        fig, ok = figures["DNS: added machine CPU per 100k queries ≤ 0.6 × nginx's"]
        self.assertIsNone(ok)
        self.assertIn("no verdict", fig)


if __name__ == "__main__":
    unittest.main()
