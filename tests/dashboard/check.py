#!/usr/bin/env python3
"""Opens the sluicegate dashboard in headless Chromium and checks it from the DOM.

Usage: check.py URL BACKEND[,BACKEND...] SCREENSHOT.png

Chromium is driven through the DevTools protocol (browser.py: nothing needs installing besides
Debian's `chromium`). The check passes when, within the time limits:
  1. every backend listed is shown as a row of the table,
  2. the page receives the live event stream (the header says "(live)"),
  3. the connection counters shown move while the caller generates traffic,
  4. the charts have data (history of at least 8 frames) and the fairness index is shown.
It also prints the days to expiry shown for each TLS-terminating service (`tls_days`), and each UDP
service's datagrams up and down and its backends' (`udp`), for the caller to check.
A screenshot is written to SCREENSHOT (keep it out of git). Exit status 0 on success, 1 with a
message on failure, 77 when no Chromium is installed.
"""
import json
import sys

from browser import browser, wait

STATE_JS = """JSON.stringify({
  transport: (document.getElementById('transport') || {}).textContent || '',
  rows: [...document.querySelectorAll('tr[data-backend]')].map(r => ({
    backend: r.dataset.backend, total: +r.querySelector('.total').textContent,
    active: +r.querySelector('.active').textContent })),
  history: typeof history === 'object' ? history.length : 0,
  jain: [...document.querySelectorAll('.jain')].map(e => e.textContent),
  tls_days: [...document.querySelectorAll('.tls-days')].map(e => e.textContent),
  serving_tier: [...document.querySelectorAll('.serving-tier')].map(e => e.textContent),
  tiers: [...document.querySelectorAll('.tier')].map(e => e.textContent),
  udp: [...document.querySelectorAll('section.service[data-protocol=udp]')].map(sec => ({
    service: sec.dataset.service,
    up: (sec.querySelector('.udp-up') || {}).textContent || '',
    down: (sec.querySelector('.udp-down') || {}).textContent || '',
    backends: [...sec.querySelectorAll('tr[data-backend]')].map(r => ({
      backend: r.dataset.backend,
      datagrams: ((r.querySelector('.udp-dgrams') || {}).firstChild || {}).textContent || '' })) })),
})"""


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    url, backends, shot = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    with browser() as cdp:
        cdp.call("Page.navigate", {"url": url})

        def state():
            v = cdp.eval(STATE_JS)
            return json.loads(v) if v else None

        def all_shown():
            s = state()
            if not s:
                return None
            shown = {r["backend"] for r in s["rows"]}
            return s if all(b in shown for b in backends) and s["transport"] == "(live)" else None

        first = wait(20, f"every backend ({', '.join(backends)}) shown with the live stream", all_shown)
        base = {r["backend"]: r["total"] for r in first["rows"]}

        def moved():
            s = state()
            if not s:
                return None
            now = {r["backend"]: r["total"] for r in s["rows"]}
            grew = [b for b in backends if now.get(b, 0) > base.get(b, 0)]
            return s if len(grew) == len(backends) and s["history"] >= 8 else None

        last = wait(30, "every backend's counter moved and the charts have 8 frames", moved)
        if not last["jain"] or last["jain"][0] in ("", "–"):
            raise SystemExit("dashboard check failed: no fairness index shown")
        cdp.screenshot(shot)
        print(json.dumps({"ok": True, "first": first["rows"], "last": last["rows"],
                          "frames": last["history"], "fairness": last["jain"],
                          "tls_days": last["tls_days"], "serving_tier": last["serving_tier"],
                          "tiers": last["tiers"], "udp": last["udp"], "screenshot": shot}))


if __name__ == "__main__":
    main()
