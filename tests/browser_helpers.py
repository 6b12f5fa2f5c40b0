"""Headless Chromium for tests, driven with Selenium over Debian's `chromium` and
`chromium-driver` (`.ci/run` installs them). Without them a browser test is skipped, unless
OC_ENGINE_REQUIRE_BROWSER is set (as CI sets it): then it fails."""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest

from oc_engine.bench import browser
from oc_engine.errors import OcEngineError


def browser_paths() -> tuple[str, str]:
    try:
        return browser.browser_paths()
    except OcEngineError as exc:
        if os.environ.get("OC_ENGINE_REQUIRE_BROWSER"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@contextlib.contextmanager
def chromium():
    """A headless Chromium that logs its network traffic (see `Traffic`)."""
    browser_paths()
    with browser.chromium(log_network=True) as driver:
        yield driver


class Traffic:
    """Every response the page received, read over the DevTools protocol (not through the page's
    own code). `collect()` reads those finished since its last call into `received`.

    Chromium may drop a finished response's body (its DevTools buffer evicts old ones): the
    buffers are raised, a failed read is retried, and a body that still cannot be read is kept
    as None unless its URL ends with one of `needed`, where it fails."""

    def __init__(self, driver, needed: tuple[str, ...] = ("/v1/chat/completions",)):
        self.driver, self.urls, self.needed = driver, {}, needed
        self.received: list[tuple[str, str | None]] = []  # (url, body)
        driver.execute_cdp_cmd("Network.enable", {"maxTotalBufferSize": 200_000_000,
                                                  "maxResourceBufferSize": 50_000_000})

    def collect(self) -> list[tuple[str, str | None]]:
        finished = []
        for entry in self.driver.get_log("performance"):  # each entry is returned once
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.responseReceived":
                if params["response"]["url"].startswith("data:"):
                    continue  # the driver's blank start page ("data:,"), which has no body to read
                self.urls[params["requestId"]] = params["response"]["url"]
            elif message["method"] == "Network.loadingFinished" and params["requestId"] in self.urls:
                finished.append(params["requestId"])
        new = []
        for request_id in finished:
            url = self.urls[request_id]
            new.append((url, self.body(request_id, needed=url.split("?")[0].endswith(self.needed))))
        self.received += new
        return new

    def body(self, request_id: str, needed: bool) -> str | None:
        from selenium.common.exceptions import WebDriverException

        for attempt in range(3):
            try:
                return self.driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})["body"]
            except WebDriverException:
                if attempt == 2 and needed:
                    raise
                time.sleep(0.2)
        return None
