"""The status page in a real browser: Debian's chromium driven by selenium through chromedriver.

A tree runs in a ``run.py run`` process; ``run.py serve`` runs in another;
the browser opens the run's page, sees it live, is refused a stop as another
user, stops it as its owner, and sees every node turn TERMINATED without a
reload. The database, read through the test's own connection, agrees.

Skipped locally with the reason when chromium, chromedriver or selenium is
missing; under CI=true that is a failure (``.ci/run`` installs them).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn

import pytest

from tests.acceptance.support import start_tree
from tests.helpers import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_TIMEOUT = 30.0


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires it (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        _unavailable(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,700"):
        options.add_argument(argument)
    # An explicit driver path: selenium-manager never goes looking on the network.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(BROWSER_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def base_url(cli) -> str:
    line = cli.start("serve", "--port", "0").first_line()
    match = re.fullmatch(r"serving (http://127\.0\.0\.1:\d+/)", line)
    assert match, f"unexpected first line {line!r}"
    return match[1]


def page_statuses(driver: Any) -> dict[str, str]:
    """Execution id -> the status text each node of the page shows."""
    return driver.execute_script(
        "var out = {};"
        "document.querySelectorAll('li.node').forEach(function (li) {"
        "  out[li.dataset.id] = li.querySelector(':scope > .row > .status').textContent; });"
        "return out;")


def test_the_page_shows_a_live_tree_and_stops_it(cli, observer, browser, base_url, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    process, root, rows = start_tree(cli, observer, "parent", 3, user="alice")
    wait = WebDriverWait(browser, BROWSER_TIMEOUT, poll_frequency=0.02)

    browser.get(base_url)
    browser.find_element(By.LINK_TEXT, root).click()
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
    assert page_statuses(browser) == {execution_id: "RUNNING" for execution_id in rows}
    assert len(browser.find_elements(By.CSS_SELECTOR, "form.stop")) == 3, "a stop button on every active execution"
    # Set in this page's window: gone if anything reloads the page.
    browser.execute_script("window.notReloaded = true;")

    # As another user: refused, and nothing changes.
    before = observer.snapshot()
    user = browser.find_element(By.ID, "stop-user")
    user.send_keys("mallory")
    browser.find_element(By.CSS_SELECTOR, f'li.node[data-id="{root}"] > .row button').click()
    wait.until(lambda d: "403" in d.find_element(By.ID, "message").text)
    assert "Stop refused" in browser.find_element(By.ID, "message").text
    assert observer.snapshot() == before
    assert page_statuses(browser) == {execution_id: "RUNNING" for execution_id in rows}

    # As the owner, with cascade (checked by default).
    user.clear()
    user.send_keys("alice")
    form = browser.find_element(By.CSS_SELECTOR, f'li.node[data-id="{root}"] > .row > form.stop')
    assert form.find_element(By.NAME, "cascade").is_selected()
    form.find_element(By.TAG_NAME, "button").click()

    seen_in_db = wait_until(
        lambda: set(observer.subtree_statuses(root).values()) == {"TERMINATED"} and time.monotonic(),
        BROWSER_TIMEOUT, "the tree TERMINATED in the database")
    wait.until(lambda d: set(page_statuses(d).values()) == {"TERMINATED"})
    shown_after = time.monotonic() - seen_in_db
    browser.save_screenshot(str(tmp_path / "status-page.png"))

    assert page_statuses(browser) == {execution_id: "TERMINATED" for execution_id in rows}
    assert shown_after < 1.0, f"the page showed TERMINATED {shown_after:.2f}s after the database had it"
    assert browser.execute_script("return window.notReloaded === true;"), "the page was reloaded"
    assert browser.find_elements(By.CSS_SELECTOR, "form.stop") == [], "no stop button on an ended execution"
    wait.until(lambda d: d.find_element(By.ID, "message").text.startswith("Stopped: 3 terminated"))
    wait.until(lambda d: d.find_element(By.ID, "live").text == "ended")

    # The database, through the test's own connection, agrees; the run process saw its tree end.
    assert observer.subtree_statuses(root) == {execution_id: "TERMINATED" for execution_id in rows}
    assert process.wait() == 3, process.describe()
