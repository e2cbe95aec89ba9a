#!/usr/bin/env python3
"""What listing 100,000 live connections costs the data plane (issue 68: "listing 100,000 connections
must not stall a data-plane thread").

Usage (from the repository root):
    python3 benchmarks/console_listing.py [--rounds 6] [--connections 100000] [--release]
                                          [--out benchmarks/results]
    python3 benchmarks/console_listing.py --report FILE.json    # the report again, nothing run

100,000 real connections need 400,000 descriptors (client, the proxy's two sides, backend), beyond
this machine's hard limit of 20,000, so the measurement is of the registry itself, the only thing a
listing shares with the data plane: the library test
`admin::connections::tests::listing_figures_at_100k_connections` (built as `cargo test` builds it:
sluicegate at opt-level 1, its dependencies at 2; `--release` for the release profile, whose fat LTO
build takes long on a small machine) registers that many connections, then in each round runs a
data-plane stand-in (each step opens a connection, marks it relaying, adds bytes to and reads the
facts of an open one, and closes it: what a connection's life does to the registry) for 1.5 s with
no listing, and 1.5 s with `GET /connections`' listing (every connection filtered, 1,000 rendered)
running back to back on another thread. Per phase: the stand-in's slowest step and its 99.9th
percentile (µs), its waits (voluntary context switches, from /proc/thread-self/status) per 1,000
steps, and the listing's median duration (ms). The report gives medians over rounds with the lowest
and highest. The machine is shared: these are figures, never a test's assertion.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TEST = "admin::connections::tests::listing_figures_at_100k_connections"
FIELDS = [
    ("quiet_max_us", "slowest step, no listing (µs)"),
    ("listing_max_us", "slowest step, listings running (µs)"),
    ("quiet_p999_us", "p99.9 step, no listing (µs)"),
    ("listing_p999_us", "p99.9 step, listings running (µs)"),
    ("quiet_waits_per_1k", "waits per 1,000 steps, no listing"),
    ("listing_waits_per_1k", "waits per 1,000 steps, listings running"),
    ("list_ms_median", "one listing of every connection (ms)"),
    ("listings", "listings per 1.5 s phase"),
]


def parse_rounds(out):
    """The JSON lines the test printed, in order; anything else it printed is skipped."""
    rounds = []
    for line in out.splitlines():
        # The first may follow the test's name on its line ("test ... {json}").
        at = line.find("{")
        if at >= 0 and '"round"' in line:
            rounds.append(json.loads(line[at:]))
    if not rounds:
        raise ValueError("the test printed no round: did it run? (is it still #[ignore]d under this name?)")
    return rounds


def summary(rounds):
    """Per field: (median, lowest, highest) over rounds."""
    out = {}
    for key, _ in FIELDS:
        xs = [r[key] for r in rounds]
        out[key] = (statistics.median(xs), min(xs), max(xs))
    return out


def report(data):
    s = summary(data["rounds"])
    lines = [
        f"# Listing {data['connections']:,} live connections: what it costs the data plane",
        "",
        f"Run {data['when']}, `python3 benchmarks/console_listing.py` ({len(data['rounds'])} rounds, "
        f"{data.get('profile', 'release')} profile; method in the script's docstring). Medians with the "
        "lowest and highest round.",
        "",
        "| figure | median | lowest | highest |",
        "|---|---:|---:|---:|",
    ]
    for key, label in FIELDS:
        m, lo, hi = s[key]
        lines.append(f"| {label} | {m:.1f} | {lo:.1f} | {hi:.1f} |")
    lines += [
        "",
        "A listing holds one shard's lock (of 16) only while it copies at most 256 handles, then reads "
        "those connections with no lock held before it takes the lock again; the JSON is built on the "
        "admin API's own thread.",
    ]
    return "\n".join(lines) + "\n"


def run(args):
    env = dict(os.environ, SLUICEGATE_LISTING_N=str(args.connections),
               SLUICEGATE_LISTING_ROUNDS=str(args.rounds))
    cmd = ["cargo", "test"] + (["--release"] if args.release else []) + [
        "--lib", "--", "--ignored", "--exact", TEST, "--nocapture", "--test-threads", "1"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if p.returncode != 0:
        sys.exit(f"the measurement failed ({' '.join(cmd)}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {"connections": args.connections, "profile": "release" if args.release else "test (opt-level 1)",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rounds": parse_rounds(p.stdout)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--release", action="store_true", help="the release profile (fat LTO: a long build)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)), end="")
        return
    data = run(args)
    stem = os.path.join(args.out, "console-listing-" + time.strftime("%Y-%m-%d-%H%M", time.gmtime()))
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    text = report(data)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
