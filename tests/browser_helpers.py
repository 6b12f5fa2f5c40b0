"""Headless Chromium for tests, driven with Selenium over Debian's `chromium` and
`chromium-driver` (`.ci/run` installs them). Without them a browser test is skipped, unless
OC_ENGINE_REQUIRE_BROWSER is set (as CI sets it): then it fails."""

from __future__ import annotations

import contextlib
import json
import os

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
    own code). `collect()` reads those finished since its last call into `received`."""

    def __init__(self, driver):
        self.driver, self.urls = driver, {}
        self.received: list[tuple[str, str]] = []  # (url, body)

    def collect(self) -> list[tuple[str, str]]:
        finished = []
        for entry in self.driver.get_log("performance"):  # each entry is returned once
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message["method"] == "Network.responseReceived":
                self.urls[params["requestId"]] = params["response"]["url"]
            elif message["method"] == "Network.loadingFinished" and params["requestId"] in self.urls:
                finished.append(params["requestId"])
        new = []
        for request_id in finished:
            body = self.driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})
            new.append((self.urls[request_id], body["body"]))
        self.received += new
        return new
