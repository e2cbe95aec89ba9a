#!/usr/bin/env python3
"""Acts through the sluicegate dashboard in headless Chromium, and checks each action landed.

Usage: SLUICEGATE_DASHBOARD_TOKEN=TOKEN act.py URL SERVICE BACKEND TIERED SCREENSHOT.png

Against a balancer whose admin API has that token, with SERVICE holding open connections (its
backend BACKEND among them) and TIERED, a service with `failback: never`, held on its backup tier
with its primary healthy again. Every click is a real mouse event at the button's centre
(browser.py). In order, each bounded by a deadline:
  1. locked, Drain is refused: the row and the header show the 401, and the backend stays active;
  2. the token is typed in and kept (sessionStorage): the page says unlocked;
  3. Drain, Maint (two clicks: it asks for a confirmation), Ready and a new weight each land, as
     `GET /backends` shows, and the event log panel shows each change (`backend_state`,
     `backend_weight`);
  4. Failback on TIERED brings tier 0 back (`/stats`), and the log shows the operator's `service_tier`;
  5. SERVICE's connections, opened, list every open one; Kill (two clicks) ends exactly one: it is
     gone from `GET /connections` (404 by id, the total one less), from the page, and the log shows
     `connection_killed`;
  6. the token is nowhere but sessionStorage: not in the page's URL, any URL it fetched, a cookie,
     or the DOM.
It prints JSON with the killed connection's `id` and `client` (for the caller to check that this
client, and only it, saw its connection end). A screenshot goes to SCREENSHOT (keep it out of git).
Exit status 0 on success, 1 with a message on failure, 77 when no Chromium is installed.
"""
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from browser import browser, wait

LIMIT = 20  # seconds for each step to show


def fail(what):
    raise SystemExit(f"dashboard action check failed: {what}")


class Page:
    def __init__(self, cdp, admin):
        self.cdp = cdp
        self.admin = admin

    def api(self, path):
        """`GET path` from the admin API: (status, JSON)."""
        try:
            with urllib.request.urlopen(self.admin + path, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def js(self, expr):
        v = self.cdp.eval(f"JSON.stringify({expr})")
        return json.loads(v) if v else None

    def click(self, find, what):
        """A real click: mouse events at the centre of what the JS expression `find` finds, which must
        be the element on top there."""
        at = self.js(f"""(() => {{ const e = {find}; if (!e) return null;
            e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            const x = r.left + r.width / 2, y = r.top + r.height / 2;
            return {{x, y, top: e.contains(document.elementFromPoint(x, y))}}; }})()""")
        if not at or not at["top"]:
            fail(f"{what}: not on the page, or covered ({at})")
        for kind in ("mousePressed", "mouseReleased"):
            self.cdp.call("Input.dispatchMouseEvent",
                          {"type": kind, "x": at["x"], "y": at["y"], "button": "left", "clickCount": 1})

    def type(self, find, text, what):
        self.click(find, what)
        self.cdp.call("Input.insertText", {"text": text})

    def log_has(self, *parts):
        """The first line of the event log panel with every one of `parts`, or None."""
        lines = self.js("[...document.querySelectorAll('#log > div')].map(d => d.textContent)") or []
        return next((line for line in lines if all(p in line for p in parts)), None)


def row(service, backend):
    return (f"[...document.querySelectorAll('tr[data-backend]')].find(r => r.dataset.service === "
            f"{json.dumps(service)} && r.dataset.backend === {json.dumps(backend)})")


def section(service):
    return f"[...document.querySelectorAll('section.service')].find(s => s.dataset.service === {json.dumps(service)})"


def backend_steps(p, service, backend):
    """Drain, Maint, Ready and a weight, each seen in `GET /backends` and in the log panel."""
    r = row(service, backend)
    path = f"/backends/{urllib.parse.quote(service, safe='')}/{urllib.parse.quote(backend, safe='')}"

    def state_is(want):
        return lambda: want if p.api(path)[1].get("state") == want else None

    def result():
        return p.js(f"{r}.querySelector('.result').textContent")

    for act, state, clicks in (("drain", "draining", 1), ("maint", "maint", 2), ("ready", "active", 1)):
        for n in range(clicks):
            p.click(f"{r}.querySelector('button[data-act=\"{act}\"]')", act)
            if n + 1 < clicks:
                # The first click only asks for the confirmation.
                wait(LIMIT, f"{act} asks to confirm", lambda a=act: p.js(
                    f"{r}.querySelector('button[data-act=\"{a}\"]').textContent.startsWith('confirm') || null"))
                if p.api(path)[1].get("state") == state:
                    fail(f"{act} acted on its first click")
        wait(LIMIT, f"{act}: GET {path} says {state}", state_is(state))
        wait(LIMIT, f"{act}: the row says ok", lambda: (result() or "").startswith("ok") or None)
        wait(LIMIT, f"{act}: the log shows backend_state {state}",
             lambda s=state: p.log_has("backend_state", f"backend={backend}", f"state={s}"))
    p.type(f"{r}.querySelector('input.weight')", "7", "the weight field")
    p.click(f"{r}.querySelector('button[data-act=\"weight\"]')", "Set")
    wait(LIMIT, f"weight: GET {path} says 7", lambda: p.api(path)[1].get("weight") == 7 or None)
    wait(LIMIT, "weight: the log shows backend_weight 7",
         lambda: p.log_has("backend_weight", f"backend={backend}", "weight=7"))


def failback_step(p, tiered):
    def serving():
        _, stats = p.api("/stats")
        return next((s.get("serving_tier") for s in stats["services"] if s["name"] == tiered), None)

    wait(LIMIT, f"{tiered} held on its backup (/stats)", lambda: serving() == 1 or None)
    p.click(f"{section(tiered)}.querySelector('button[data-act=\"failback\"]')", "Failback")
    wait(LIMIT, f"{tiered}: tier 0 serves again (/stats)", lambda: serving() == 0 or None)
    wait(LIMIT, "failback: the log shows the operator's service_tier",
         lambda: p.log_has("service_tier", f"service={tiered}", "reason=operator"))
    wait(LIMIT, "failback: the answer shown", lambda: p.js(
        f"{section(tiered)}.querySelector('.svc-acts .result').textContent.startsWith('ok') || null"))


def kill_step(p, service):
    sec = section(service)
    listing = f"/connections?service={urllib.parse.quote(service)}&limit=100"
    before = p.api(listing)[1]["total"]
    if before < 2:
        fail(f"{service} holds {before} connection(s): the caller holds more")
    p.click(f"{sec}.querySelector('button[data-act=\"conns\"]')", "Connections")
    rows = f"[...{sec}.querySelectorAll('tr[data-conn]')]"
    wait(LIMIT, f"the page lists {before} connections", lambda: p.js(f"{rows}.length") == before or None)
    first = p.js(f"(r => ({{id: +r.dataset.conn, client: r.dataset.client}}))({rows}[0])")
    kill = f"{rows}.find(r => r.dataset.conn === '{first['id']}').querySelector('button[data-act=\"kill\"]')"
    p.click(kill, "Kill")
    p.click(kill, "Kill, confirmed")
    wait(LIMIT, f"connection {first['id']} gone (404)",
         lambda: p.api(f"/connections/{first['id']}")[0] == 404 or None)
    after = p.api(listing)[1]["total"]
    if after != before - 1:
        fail(f"{before} connections before the kill, {after} after: one kill ends exactly one")
    wait(LIMIT, "the log shows connection_killed",
         lambda: p.log_has("connection_killed", f"id={first['id']} ", f"client={first['client']}"))
    wait(LIMIT, f"the page lists {after} connections", lambda: p.js(f"{rows}.length") == after or None)
    return first, before


def main():
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    url, service, backend, tiered, shot = sys.argv[1:]
    token = os.environ.get("SLUICEGATE_DASHBOARD_TOKEN", "")
    if len(token) < 16:
        raise SystemExit("SLUICEGATE_DASHBOARD_TOKEN: the admin token, at least 16 characters")
    with browser() as cdp:
        p = Page(cdp, url.rstrip("/"))
        cdp.call("Page.navigate", {"url": url})
        wait(LIMIT, "the backend's row with the live stream", lambda: p.js(
            f"!!{row(service, backend)} && document.getElementById('transport').textContent === '(live)' || null"))
        if p.js("document.getElementById('lock').textContent") != "locked":
            fail("the page does not start locked")
        p.click(f"{row(service, backend)}.querySelector('button[data-act=\"drain\"]')", "Drain, locked")
        wait(LIMIT, "the 401 shown in the row and the header", lambda: p.js(
            f"{row(service, backend)}.querySelector('.result').textContent.includes('401')"
            " && document.getElementById('auth-msg').textContent.includes('401') || null"))
        if p.api(f"/backends/{service}/{urllib.parse.quote(backend, safe='')}")[1].get("state") != "active":
            fail("a drain without the token changed the backend")
        p.type("document.getElementById('token')", token, "the token field")
        p.click("document.getElementById('unlock')", "Unlock")
        wait(LIMIT, "unlocked", lambda: p.js("document.getElementById('lock').textContent") == "unlocked" or None)
        backend_steps(p, service, backend)
        failback_step(p, tiered)
        killed, before = kill_step(p, service)
        seen = p.js("""({url: location.href, cookie: document.cookie, dom: document.documentElement.outerHTML,
            fetched: performance.getEntries().map(e => e.name),
            stored: sessionStorage.getItem('sluicegate-admin-token')})""")
        if seen["stored"] != token:
            fail("the token is not in sessionStorage")
        for where in ("url", "cookie", "dom"):
            if token in seen[where]:
                fail(f"the token is in the page's {where}")
        if any(token in u for u in seen["fetched"]):
            fail("the token is in a URL the page fetched")
        cdp.screenshot(shot)
        print(json.dumps({"ok": True, "killed": killed, "connections_before": before, "screenshot": shot}))


if __name__ == "__main__":
    main()
