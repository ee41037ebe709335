"""The server's dashboard in a real browser: Debian's Chromium, driven by Playwright,
watches a real fleet train; and nobody without the admin token or certificate gets in."""

from __future__ import annotations

import os
import shutil
import ssl
import time
from pathlib import Path

import httpx
import pytest
from conftest import finished, write_config
from playwright.sync_api import Page, sync_playwright

from fedge.launch import Launcher, free_port, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = "FEDGE_DASHBOARD_SCREENSHOT"
"""Set to a path (docs/dashboard.png) to keep the test's screenshot there."""


def _tls(fleet: Launcher, name: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(fleet.certs / "ca.crt"))
    if name is not None:
        context.load_cert_chain(fleet.certs / f"{name}.crt", fleet.certs / f"{name}.key")
    return context


def _points(page: Page) -> int:
    return page.locator("#chart circle.point.acc").count()


def _state(page: Page) -> str:
    return page.locator("#state").inner_text()


def test_dashboard_follows_a_training_fleet_in_chromium(tmp_path: Path) -> None:
    config = write_config(tmp_path / "app", num_clients=3, rounds=8, fit_delay=0.8)
    with Launcher(tmp_path, config) as fleet:
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        fleet.issue("node-2")
        server = fleet.server("--wait-for", "2", "--dashboard", f"127.0.0.1:{port}")
        fleet.node(0)
        fleet.node(1)

        def get(path: str, context: ssl.SSLContext, **headers: str) -> httpx.Response | None:
            try:
                return httpx.get(url + path, verify=context, headers=headers, timeout=5)
            except httpx.HTTPError:
                return None

        plain = _tls(fleet)
        wait_for(lambda: get("/", plain), "the dashboard to listen")
        token_file = fleet.state_dir / "dashboard.token"  # made before it listens
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        # no token, a wrong token, a node's certificate: 401; the token or an admin: 200
        wrong = {"authorization": "Bearer " + "x" * len(token)}
        for path in ("/", "/api/snapshot", "/api/events"):
            assert get(path, plain).status_code == 401, path  # type: ignore[union-attr]
            assert get(path, plain, **wrong).status_code == 401, path  # type: ignore[union-attr]
            node = get(path, _tls(fleet, "node-0"))
            assert node is not None and node.status_code == 401, path
        bad_cookie = httpx.get(
            url + "/api/snapshot", verify=plain, cookies={"fedge_dashboard": "0"}
        )
        assert bad_cookie.status_code == 401
        snapshot = get("/api/snapshot", plain, authorization=f"Bearer {token}")
        assert snapshot is not None and snapshot.status_code == 200
        assert snapshot.json()["config"]["strategy"] == "FedAvg"
        admin = get("/api/snapshot", _tls(fleet, "admin"))
        assert admin is not None and admin.status_code == 200

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page(
                    ignore_https_errors=True, viewport={"width": 1280, "height": 800}
                )
                response = page.goto(url + "/")
                assert response is not None and response.status == 401
                page.fill("input[name=token]", "not-the-token-at-all")
                page.click("button[type=submit]")
                page.wait_for_selector("text=That is not the admin token.")
                page.fill("input[name=token]", token)
                page.click("button[type=submit]")
                page.wait_for_selector("#link.on", timeout=10_000)  # the event stream is open
                assert token not in page.content()
                # its policy lets its own stylesheet and script run, and nothing else
                assert page.locator("header").evaluate("e => getComputedStyle(e).display") == "flex"

                # the page's policy allows no eval: waits poll locators from here
                wait_for(lambda: _points(page) >= 1, "a first point on the chart")
                first = _points(page)
                first_rounds = page.locator("#round-rows tr").count()
                row = page.locator("tr[data-node='node-0'] td")
                assert row.nth(1).inner_text() == "0"  # client id
                assert row.nth(3).inner_text() == "live"
                assert row.nth(7).inner_text() != "–"  # the version it announced
                assert page.locator("#strategy").inner_text() == "FedAvg"
                assert _state(page) == "running"
                assert not page.locator("tr[data-node='node-2']").count()
                fleet.node(2)  # a node that joins while the page is open appears in it
                page.wait_for_selector("tr[data-node='node-2']", timeout=20_000)
                wait_for(lambda: _points(page) > first, "more points on the chart", 20)
                assert page.locator("#round-rows tr").count() > first_rounds
                assert int(row.nth(5).inner_text()) >= 1  # tasks done
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if os.environ.get(SCREENSHOT):
                    shutil.copy(shot, os.environ[SCREENSHOT])
                # the server sends its final state before it exits; the page keeps it
                wait_for(lambda: _state(page) == "finished", "the run to finish", 30)
                assert _points(page) == 8
                assert page.locator("#round").inner_text().startswith("8 of 8")
            finally:
                browser.close()
        finished(server, fleet)
        # the token never reaches the server's log
        time.sleep(0.1)
        assert token not in fleet.log("server", tail=1_000_000)
