"""Headless Chromium (Debian's `chromium`) driven over the Chrome DevTools Protocol: load a page,
collect its console errors and uncaught exceptions, evaluate JavaScript, take a full-page
screenshot. For tests only; `websockets`' synchronous client, no browser-automation framework."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["chromium_binary", "Page", "open_page"]


def chromium_binary() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Page:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.console_errors: list[str] = []
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.console_errors.append(params["entry"].get("text", ""))

    def wait_event(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        if any(e.get("method") == name for e in self.events):
            return next(e for e in self.events if e.get("method") == name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self._event(msg)
            if msg.get("method") == name:
                return msg
        raise TimeoutError(f"no {name} within {timeout_s} s")

    def evaluate(self, expression: str) -> Any:
        got = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"page script failed: {got['exceptionDetails']}")
        return got["result"].get("value")

    def screenshot(self, path: Path, width: int) -> tuple[int, int]:
        """The whole page, `width` CSS pixels wide; returns (width, height)."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, timeout_s=60)
        path.write_bytes(base64.b64decode(shot["data"]))
        return width, height


class open_page:  # noqa: N801 (a context manager, used like a function)
    """`with open_page(url) as page:` a loaded page in a fresh headless Chromium; stopped after."""

    def __init__(self, url: str, width: int = 1000, height: int = 800) -> None:
        self.url, self.width, self.height = url, width, height

    def __enter__(self) -> Page:
        from websockets.sync.client import connect

        binary = chromium_binary()
        assert binary is not None
        self.profile = tempfile.mkdtemp(prefix="ecoserve-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self._stop()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        import httpx

        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None).__enter__()
        p = Page(self.ws)
        for domain in ("Page", "Runtime", "Log"):
            p.call(f"{domain}.enable")
        p.call("Page.navigate", url=self.url)
        p.wait_event("Page.loadEventFired", timeout_s=60)
        return p

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        try:
            self.ws.close()
        finally:
            self._stop()
