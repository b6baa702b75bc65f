"""The web dashboard in a real headless Chromium: refused without the token, the live RPO of
a protected group, pause and resume, a test failover started from the page that
``ferry status`` then shows; writes docs/dashboard.png for the README."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import nbd
import pytest
from conftest import Lab

from agent.errors import Forbidden
from lab.sites import REPO, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                                reason="needs chromium and chromium-driver (make deps)")


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fy-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--user-data-dir=" + profile):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    """Wait for ``predicate`` to be true. The page is redrawn every 2 s: an element found can
    be replaced before it is read, or be missing for a moment; both count as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting for " + what)


def text(driver: Any, selector: str) -> str:
    """The text of the element ``selector`` names, read again if it was redrawn meanwhile."""
    from selenium.webdriver.common.by import By
    return str(wait_until(lambda: driver.find_element(By.CSS_SELECTOR, selector).text, 15,
                          selector))


def click(driver: Any, selector: str) -> None:
    """Click the element once the page shows it (it is redrawn every 2 s: a click can meet
    an element just replaced, and is then tried again)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except (NoSuchElementException, StaleElementReferenceException):
            return False
    wait_until(attempt, 15, selector)


def confirm(driver: Any, selector: str, ok: bool = True) -> None:
    from selenium.webdriver.common.by import By
    click(driver, selector)
    wait_until(lambda: driver.find_element(By.ID, "confirm").is_displayed(), 10, "dialog")
    driver.find_element(By.ID, "confirm-ok" if ok else "confirm-cancel").click()


def test_dashboard_in_headless_chromium(sites: Lab, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    ports = {}
    for site in (sites.a, sites.b):
        ports[site.name] = free_port()
        site.extra_args = ["--api", "127.0.0.1:%d" % ports[site.name]]
        site.stop()
        site.start()
    disk = sites.image("vda.img", 32 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(8):
        h.pwrite(os.urandom(MiB), i * 4 * MiB)
    h.flush()
    sites.a.ferry("checkpoint", "g1", "--tag", "before upgrade")

    # Without the token a browser gets nothing but a refusal.
    base = "http://127.0.0.1:%d" % ports["A"]
    browser.get(base + "/")
    assert "ferry dashboard-url" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.ID, "groups")
    browser.get(base + "/login?token=wrong")
    assert not browser.find_elements(By.ID, "groups")
    # The login address is told only on the local socket.
    url = sites.a.ferry("dashboard-url").stdout.strip()
    assert url.startswith(base + "/login?token=")
    with pytest.raises(Forbidden):
        from agent.client import Client
        token_file = sites.a.data / "api.token"
        Client(base, str(token_file)).call("GET", "/v1/dashboard-url")

    browser.get(url)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-rpo="g1"]'), 30,
               "the group's RPO")
    rpo = text(browser, '[data-rpo="g1"]')
    assert re.fullmatch(r"\d+\.\d s", rpo), rpo
    assert "replicating" in text(browser, '[data-state="g1"]')
    # Live: pausing from the page (with confirmation) shows in ferry status and on the page,
    # and the RPO shown grows with writes that wait.
    confirm(browser, 'button[data-action="pause"][data-group="g1"]')
    wait_until(lambda: sites.a.status("g1")["groups"]["g1"]["state"] == "paused", 15,
               "paused")
    h.pwrite(os.urandom(MiB), 0)
    h.flush()
    wait_until(lambda: float(browser.find_element(By.CSS_SELECTOR, '[data-rpo="g1"]')
                             .text.split()[0]) >= 2.0, 30, "a growing RPO on the page")
    confirm(browser, 'button[data-action="resume"][data-group="g1"]')
    wait_until(lambda: sites.a.status("g1")["groups"]["g1"]["state"] == "replicating", 30,
               "resumed")
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    # A cancelled confirmation does nothing.
    confirm(browser, 'button[data-action="pause"][data-group="g1"]', ok=False)
    time.sleep(1)
    assert sites.a.status("g1")["groups"]["g1"]["state"] == "replicating"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, 'svg[data-chart="g1"] polyline'),
               30, "the RPO chart")
    time.sleep(2.5)
    browser.save_screenshot(str(REPO / "docs" / "dashboard.png"))

    # Site B: the replica, its window and checkpoints; a test failover from the page.
    browser.get(sites.b.ferry("dashboard-url").stdout.strip())
    confirm(browser, 'button[data-action="test-start"][data-group="g1"]')
    test = wait_until(lambda: sites.b.status("g1")["replicas"]["g1"]["test"], 60,
                      "the test failover in ferry status")
    assert "test failover %s running" % test["id"] in sites.b.ferry("status").stdout
    wait_until(lambda: test["id"] in browser.find_element(By.CSS_SELECTOR,
                                                          '[data-test="g1"]').text, 15,
               "the test on the page")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR,
                                             'svg[data-timeline="g1"] line.cp.user'), 20,
               "the tagged checkpoint on the timeline")
    browser.save_screenshot(str(REPO / "docs" / "dashboard-target.png"))
    confirm(browser, 'button[data-action="test-stop"][data-group="g1"]')
    wait_until(lambda: sites.b.status("g1")["replicas"]["g1"]["test"] is None, 30,
               "the test stopped")
    h.shutdown()

    def failovers() -> list:
        events = [json.loads(x) for x in sites.b.ferry("events", "--json").stdout.splitlines()]
        return [e["change"] for e in events if e["kind"] == "failover"]

    wait_until(lambda: failovers() == ["started", "stopped"], 10, "failover events")
    assert Path(REPO / "docs" / "dashboard.png").stat().st_size > 10000


def test_the_dashboard_needs_a_tcp_listener(sites: Lab) -> None:
    proc = sites.a.ferry("dashboard-url", check=False)
    assert proc.returncode == 3 and "no TCP listener" in proc.stderr
    # On the local socket the files are served too (curl --unix-socket, a local proxy).
    page = sites.a.api("GET", "/")
    assert "<title>Ferry</title>" in page
    assert "function refresh" in sites.a.api("GET", "/ui/app.js")
    from agent.errors import NotFound
    with pytest.raises(NotFound):
        sites.a.api("GET", "/ui/../api.py")
