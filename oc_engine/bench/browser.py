"""Headless Chromium driven with Selenium, for the guard console's bench and tests: Debian's
`chromium` and `chromium-driver` (apt-get install chromium chromium-driver) and the `selenium`
package (in the dev group)."""

from __future__ import annotations

import contextlib
import os
import shutil

from oc_engine.errors import OcEngineError

# Chromium's own connections (updates, sync, field trials) are refused on a closed network and
# slow every start; these flags turn them off.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), from OC_ENGINE_CHROMIUM / OC_ENGINE_CHROMEDRIVER or the PATH;
    raises `OcEngineError` naming what is missing."""
    chromium = os.environ.get("OC_ENGINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("OC_ENGINE_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [path for path in (chromium, driver) if not os.path.exists(path)]
    if missing:
        raise OcEngineError(f"no headless browser ({', '.join(missing)} missing): "
                            "apt-get install chromium chromium-driver")
    return chromium, driver


@contextlib.contextmanager
def chromium(log_network: bool = False):
    """A headless Chromium; `log_network`: keep its DevTools network log (`driver.get_log("performance")`)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise OcEngineError("the browser needs selenium: uv sync (it is in the dev group)") from None

    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    if log_network:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
