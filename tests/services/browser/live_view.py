#!/usr/bin/env python3
"""Drives walrelay's live view page in a real headless Chromium over the DevTools protocol.

Launches Debian's chromium (headless, its own temporary profile, DevTools on a free port read
from DevToolsActivePort), opens the page, types the token, group and tables into the form,
picks "from", clicks Connect with the mouse, and waits until a row of the changes table
contains --expect-text. Optionally saves a PNG screenshot. Chromium is stopped on every exit.

Exit 0 when the text appeared; 1 with a message on stderr (the page's status line, its rows,
JavaScript errors and Chromium's log tail) when it did not within --timeout, the page reported
an error, or Chromium failed; 2 for bad arguments.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    # Without these Chromium keeps reaching for Google's hosts, which this network refuses.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]

# What the page shows, read in the page (textContent only).
PAGE_STATE_JS = r"""
(() => {
  const rows = Array.from(document.querySelectorAll('#changes tbody tr'));
  const status = document.getElementById('status');
  return {
    ready: document.readyState,
    state: status ? status.dataset.state : null,
    status: status ? status.textContent : null,
    lag: (document.getElementById('lag') || {}).textContent || null,
    rows: rows.length,
    found: rows.some(r => r.textContent.includes(%s)),
    first: rows.slice(0, 10).map(r => Array.from(r.cells, c => c.textContent).join(' | ')),
  };
})()
"""


def log(msg):
    print(f"live_view.py: {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


class Cdp:
    """A minimal DevTools protocol client on one page target."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.pending = {}
        self.events = []  # (method, params) of the events kept
        self.errors = []  # JavaScript exceptions and console errors
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self.pending.pop(msg["id"], None)
                    if fut and not fut.done():
                        fut.set_result(msg)
                    continue
                method, params = msg.get("method"), msg.get("params", {})
                if method == "Runtime.exceptionThrown":
                    d = params.get("exceptionDetails", {})
                    self.errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "?")))
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    self.errors.append("console.error: " + " ".join(
                        str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
                elif method == "Log.entryAdded":
                    e = params.get("entry", {})
                    if e.get("level") == "error":
                        self.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
                else:
                    self.events.append((method, params))
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(Failure("the DevTools connection closed (did Chromium exit?)"))

    async def call(self, method, params=None, timeout=30):
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        msg = await asyncio.wait_for(fut, timeout)
        if "error" in msg:
            raise Failure(f"{method}: {msg['error'].get('message')}")
        return msg.get("result", {})

    async def evaluate(self, expression):
        r = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in r:
            raise Failure(f"evaluating {expression[:60]!r}: {r['exceptionDetails'].get('text')}")
        return r.get("result", {}).get("value")

    async def wait_event(self, method, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (m, p) in enumerate(self.events):
                if m == method:
                    del self.events[i]
                    return p
            await asyncio.sleep(0.05)
        raise Failure(f"no {method} within {timeout:.0f} s")


class Chromium:
    def __init__(self, binary, width, height):
        self.dir = tempfile.mkdtemp(prefix="walrelay-chromium-")
        self.log_path = os.path.join(self.dir, "chromium.log")
        profile = os.path.join(self.dir, "profile")
        os.mkdir(profile)
        self.log_file = open(self.log_path, "wb")
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.active_port_file = os.path.join(profile, "DevToolsActivePort")

    async def devtools_port(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"chromium exited with {self.proc.returncode}")
            try:
                with open(self.active_port_file) as f:
                    lines = f.read().splitlines()
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.1)
        raise Failure(f"chromium wrote no DevToolsActivePort within {timeout} s")

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        # D-Bus complaints (there is no bus here) are noise.
        return "\n".join([l for l in text.splitlines() if "dbus" not in l][-lines:])

    def stop(self):
        if self.proc.poll() is None:
            # Its own session: the group holds every helper process Chromium started.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.log_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def page_target(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        targets = json.load(r)
    pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
    if not pages:
        raise Failure(f"no page target among {[t.get('type') for t in targets]}")
    return pages[0]["webSocketDebuggerUrl"]


async def type_into(cdp, selector, text):
    """Focuses a field, clears it and types text as keyboard input."""
    ok = await cdp.evaluate(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
        " e.focus(); e.select && e.select(); return document.activeElement === e; })()")
    if not ok:
        raise Failure(f"no focusable {selector} on the page")
    # The selection is replaced by what is typed.
    await cdp.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Delete", "code": "Delete",
                                              "windowsVirtualKeyCode": 46})
    await cdp.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Delete", "code": "Delete",
                                              "windowsVirtualKeyCode": 46})
    if text:
        await cdp.call("Input.insertText", {"text": text})
    value = await cdp.evaluate(f"document.querySelector({json.dumps(selector)}).value")
    if value != text:
        raise Failure(f"{selector} holds {value!r} after typing {text!r}")


async def click(cdp, selector):
    """A real mouse click in the middle of the element."""
    box = await cdp.evaluate(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e || e.disabled) return null;"
        " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
        " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()")
    if not box:
        raise Failure(f"no enabled {selector} to click")
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        params = {"type": kind, "x": box["x"], "y": box["y"]}
        if kind != "mouseMoved":
            params.update(button="left", clickCount=1)
        await cdp.call("Input.dispatchMouseEvent", params)


async def run(args, chromium):
    port = await chromium.devtools_port()
    async with websockets.connect(page_target(port), max_size=None, open_timeout=10) as ws:
        cdp = Cdp(ws)
        for domain in ("Page", "Runtime", "Log"):
            await cdp.call(f"{domain}.enable")
        await cdp.call("Emulation.setDeviceMetricsOverride",
                       {"width": args.width, "height": args.height, "deviceScaleFactor": 1, "mobile": False})
        nav = await cdp.call("Page.navigate", {"url": args.url})
        if nav.get("errorText"):
            raise Failure(f"opening {args.url}: {nav['errorText']}")
        await cdp.wait_event("Page.loadEventFired", 30)
        if not await cdp.evaluate("!!document.getElementById('connect-form')"):
            title = await cdp.evaluate("document.title")
            raise Failure(f"{args.url} is not the live view (title {title!r})")

        await type_into(cdp, "#token", args.token)
        if args.group is not None:
            await type_into(cdp, "#group", args.group)
        if args.tables is not None:
            await type_into(cdp, "#tables", args.tables)
        if args.filter is not None:
            await type_into(cdp, "#filter", args.filter)
        await cdp.evaluate(
            f"(() => {{ const s = document.getElementById('from'); s.value = {json.dumps(args.from_)};"
            " s.dispatchEvent(new Event('change', {bubbles: true})); })()")
        await click(cdp, "#connect")
        log(f"connected the page to {args.url}, waiting for {args.expect_text!r}")

        deadline = time.monotonic() + args.timeout
        expr = PAGE_STATE_JS % json.dumps(args.expect_text)
        state = None
        while True:
            state = await cdp.evaluate(expr)
            if state["found"]:
                break
            if state["state"] == "error":
                raise Failure(f"the page reports an error: {state['status']}", state, cdp.errors)
            if time.monotonic() > deadline:
                raise Failure(f"no row containing {args.expect_text!r} within {args.timeout:.0f} s", state, cdp.errors)
            await asyncio.sleep(0.25)
        log(f"found {args.expect_text!r}: {state['rows']} rows, status {state['status']!r}")

        if args.screenshot:
            # Let the lag poll show the acknowledgements committed (0), or at least a number.
            until = time.monotonic() + 8
            while time.monotonic() < until:
                lag = (await cdp.evaluate(expr))["lag"] or ""
                if lag == "0" or (lag[:1].isdigit() and time.monotonic() > until - 4):
                    break
                await asyncio.sleep(0.25)
            await cdp.evaluate("document.activeElement && document.activeElement.blur()")
            shot = await cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
            with open(args.screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            log(f"screenshot saved to {args.screenshot}")
        # A script exception is a bug of the page; network errors in the console are not.
        if any(e.startswith("exception:") for e in cdp.errors):
            raise Failure("the page threw", state, cdp.errors)
        for e in cdp.errors:
            log(f"  page console: {e[:300]}")
        cdp.reader.cancel()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the live view page, e.g. http://127.0.0.1:8090/")
    p.add_argument("--token", required=True, help="the API token typed into the page")
    p.add_argument("--group", help="consumer group typed into the page (default: the page's own)")
    p.add_argument("--tables", help="table patterns typed into the page (default: the page's own)")
    p.add_argument("--from", dest="from_", choices=["earliest", "latest"], default="earliest")
    p.add_argument("--filter", help="text typed into the page's table filter before connecting")
    p.add_argument("--expect-text", required=True, help="wait until a row of the changes table contains this")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for it (default 60)")
    p.add_argument("--screenshot", help="save a PNG of the page here once the text appeared")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    if not os.path.exists(args.chromium):
        log(f"no chromium at {args.chromium} (apt-get install chromium, or set CHROMIUM)")
        return 1

    chromium = Chromium(args.chromium, args.width, args.height)
    # SIGTERM (a test timing out) still stops Chromium.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        asyncio.run(asyncio.wait_for(run(args, chromium), args.timeout + 90))
        return 0
    except Failure as f:
        msg, state, errors = f.args[0], (f.args[1] if len(f.args) > 1 else None), (f.args[2] if len(f.args) > 2 else [])
        log(f"FAILED: {msg}")
        if state:
            log(f"page status: [{state['state']}] {state['status']!r}, lag {state['lag']!r}, {state['rows']} rows")
            for r in state["first"]:
                log(f"  row: {r[:300]}")
        for e in errors:
            log(f"  page error: {e[:500]}")
        tail = chromium.log_tail()
        if tail:
            log("chromium's log tail:\n" + tail)
        return 1
    except (asyncio.TimeoutError, OSError, websockets.WebSocketException) as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        tail = chromium.log_tail()
        if tail:
            log("chromium's log tail:\n" + tail)
        return 1
    finally:
        chromium.stop()


if __name__ == "__main__":
    sys.exit(main())
