"""Open a report in headless Chromium and check it as a person's browser would see it.

Drives Chromium over its DevTools protocol on a pipe (``--remote-debugging-pipe``): no
WebDriver, no Node, no extra Python package; only a ``chromium`` binary (Debian:
``apt-get install chromium``). :func:`check_report` loads the page by ``file://`` and returns
what went wrong: console errors, requests to anything but the page itself and inline
``data:`` URIs, images that do not decode or are one flat colour; it also saves a full-page
screenshot.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
ENV_BROWSER = "DICE_BROWSER"

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run",
    "--no-default-browser-check", "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe",
)

_IMAGES_JS = r"""
(async () => {
  const out = [];
  for (const [i, img] of [...document.images].entries()) {
    const r = {index: i, src: img.getAttribute('src').slice(0, 40), width: 0, height: 0,
               decoded: true, colours: 0, error: ''};
    try { await img.decode(); } catch (e) { r.decoded = false; r.error = String(e); }
    r.width = img.naturalWidth; r.height = img.naturalHeight;
    if (r.width > 0 && r.height > 0) {
      const c = document.createElement('canvas');
      const s = Math.min(1, 500 / Math.max(r.width, r.height));
      c.width = Math.max(1, Math.round(r.width * s)); c.height = Math.max(1, Math.round(r.height * s));
      const ctx = c.getContext('2d');
      ctx.drawImage(img, 0, 0, c.width, c.height);
      try {
        const d = ctx.getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let p = 0; p < d.length && seen.size < 16; p += 4)
          seen.add(((d[p] << 24) | (d[p + 1] << 16) | (d[p + 2] << 8) | d[p + 3]) >>> 0);
        r.colours = seen.size;
      } catch (e) { r.error = 'cannot read pixels: ' + e; }
    }
    out.push(r);
  }
  return JSON.stringify({images: out, title: document.title,
                         height: document.documentElement.scrollHeight});
})()
"""


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer."""


@dataclass
class BrowserCheck:
    """What a browser saw when it opened a report."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    height: int = 0
    screenshot: Path | None = None
    seconds: float = 0.0
    probe: Any = None
    """What the ``probe`` expression of :func:`check_report` returned (JSON value)."""

    @property
    def problems(self) -> list[str]:
        """One line per problem; empty when the page is fine."""
        out = [f"console error: {e}" for e in self.console_errors]
        out += [f"request to {u}" for u in self.requests]
        for im in self.images:
            where = f"image {im['index']} ({im['src']}...)"
            if not im["src"].startswith("data:"):
                out.append(f"{where}: not inlined as a data: URI")
            if not im["decoded"] or im["width"] == 0:
                out.append(f"{where}: does not decode {im['error']}".rstrip())
            elif im["colours"] < 2:
                out.append(f"{where}: blank (one colour)")
            elif im["error"]:
                out.append(f"{where}: {im['error']}")
        return out


def find_browser() -> str | None:
    """Path of a Chromium-family browser: ``$DICE_BROWSER``, else the first of
    :data:`BROWSERS` on ``PATH``; None when there is none."""
    env = os.environ.get(ENV_BROWSER)
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else shutil.which(env)
    for name in BROWSERS:
        p = shutil.which(name)
        if p:
            return p
    return None


class _Chromium:
    """A headless Chromium speaking the DevTools protocol over fds 3 (in) and 4 (out)."""

    def __init__(self, exe: str, timeout: float) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="dice-chromium-")
        self.log = Path(self.profile) / "chromium.log"
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        # keep our ends away from 3 and 4, so that the child's dup2 always clears CLOEXEC
        fds = [_high_fd(fd) for fd in (r_in, w_in, r_out, w_out)]
        r_in, w_in, r_out, w_out = fds
        argv = [exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, r_in, 3),
            (os.POSIX_SPAWN_DUP2, w_out, 4),
        ]
        try:
            self.pid = os.posix_spawn(exe, argv, os.environ, file_actions=actions)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise BrowserError(f"cannot start {exe}: {exc}") from exc
        os.close(r_in)
        os.close(w_out)
        self.w, self.r = w_in, r_out
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.w, data):]
        return self.next_id

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer within {self.timeout:.0f} s"
                                   + self.log_tail())
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed the DevTools pipe" + self.log_tail())
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        mid = self.send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, session: str | None) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["method"] == method and ev.get("sessionId") == session:
                return self.events.pop(i)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if msg.get("method") == method and msg.get("sessionId") == session:
                self.events.append(msg)
                return msg
            if "method" in msg:
                self.events.append(msg)

    def log_tail(self) -> str:
        try:
            tail = self.log.read_text(errors="replace")[-600:].strip()
        except OSError:
            tail = ""
        return f"; its log ends: {tail}" if tail else ""

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except OSError:
            pass
        deadline = time.monotonic() + 5
        done = False
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                done = True
                break
            time.sleep(0.05)
        if not done:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _high_fd(fd: int) -> int:
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def check_report(html: str | Path, screenshot: str | Path | None = None, *,
                 browser: str | None = None, width: int = 1280, timeout: float = 30.0,
                 max_height: int = 20000, probe: str | None = None) -> BrowserCheck:
    """Open ``html`` by ``file://`` in headless Chromium ``width`` CSS pixels wide and report
    what it saw; save a full-page PNG screenshot to ``screenshot`` when given. ``probe``: a
    JavaScript expression evaluated in the page after the checks (before the screenshot; it
    may interact, e.g. click a table head); its JSON value lands in ``.probe``. Raises
    :class:`BrowserError` when no browser is found or it fails to start."""
    from .._util import atomic_write_bytes

    t0 = time.perf_counter()
    html = Path(html).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"report {str(html)!r} not found; write it with `dice report`")
    exe = browser or find_browser()
    if exe is None:
        raise BrowserError("no Chromium found: install it (Debian: apt-get install chromium) "
                           f"or point ${ENV_BROWSER} at a Chrome/Chromium binary")
    url = html.as_uri()
    res = BrowserCheck(url=url)
    b = _Chromium(exe, timeout)
    try:
        targets = b.call("Target.getTargets")["targetInfos"]
        pages = [t for t in targets if t["type"] == "page"]
        tid = pages[0]["targetId"] if pages else b.call(
            "Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = b.call("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
        for m in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            b.call(m, session=sid)
        b.call("Emulation.setDeviceMetricsOverride",
               {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, sid)
        b.events.clear()
        nav = b.call("Page.navigate", {"url": url}, sid)
        if nav.get("errorText"):
            raise BrowserError(f"cannot open {url}: {nav['errorText']}")
        b.wait_event("Page.loadEventFired", sid)
        ev = b.call("Runtime.evaluate", {"expression": _IMAGES_JS, "awaitPromise": True,
                                         "returnByValue": True}, sid)
        if "exceptionDetails" in ev:
            raise BrowserError(f"image check failed: {ev['exceptionDetails'].get('text')}")
        info = json.loads(ev["result"]["value"])
        res.images, res.title, res.height = info["images"], info["title"], int(info["height"])
        if probe is not None:
            pv = b.call("Runtime.evaluate", {"expression": probe, "awaitPromise": True,
                                             "returnByValue": True}, sid)
            if "exceptionDetails" in pv:
                raise BrowserError(f"probe failed: {pv['exceptionDetails'].get('text')}")
            res.probe = pv.get("result", {}).get("value")
        if screenshot is not None:
            h = max(1, min(res.height, max_height))
            b.call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": False}, sid)
            shot = b.call("Page.captureScreenshot", {"format": "png"}, sid)
            import base64

            res.screenshot = Path(screenshot)
            atomic_write_bytes(res.screenshot, base64.b64decode(shot["data"]))
        _read_events(b.events, sid, url, res)
    finally:
        b.close()
    res.seconds = time.perf_counter() - t0
    return res


def _read_events(events: list[dict[str, Any]], sid: str, url: str, res: BrowserCheck) -> None:
    for ev in events:
        if ev.get("sessionId") != sid:
            continue
        m, p = ev["method"], ev.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            res.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                               for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            res.console_errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            res.console_errors.append(f"{e.get('text', '')} {e.get('url', '')}".strip())
        elif m == "Network.requestWillBeSent":
            u = p.get("request", {}).get("url", "")
            if u != url and not u.startswith("data:"):
                res.requests.append(u)
