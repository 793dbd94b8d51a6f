"""The status page, in a real headless Chromium (Debian's, installed by scripts/install-browser).

The proxy runs in identity mode over mTLS in front of simulated replicas; the browser loads the page
from the admin port, exactly as an operator would through `kubectl port-forward`.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import aiohttp
import grpc
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh

from .helpers import TOKENS, stack
from .waits import until_sync

SCREENSHOT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
ANY_PORT = "127.0.0.1:0"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1440,900",
)


def demo_mesh() -> list[SimReplica]:
    """3 replicas, 24 proxies in 4 namespaces, with every sync state present at least once."""
    mesh = make_mesh(3, 24, tokens=TOKENS)
    proxies = [p for r in mesh for p in r.proxies]
    for p in proxies:
        p.states = {t: "SYNCED" for t in ("CDS", "LDS", "EDS", "RDS")}
    proxies[1].states["LDS"] = "ERROR"
    proxies[4].states["EDS"] = "STALE"
    proxies[9].states["RDS"] = "NOT_SENT"
    proxies[14].states["EDS"] = "STALE"
    return mesh


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("Chromium or chromedriver is missing: run scripts/install-browser (scripts/test does)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # An explicit driver path: Selenium Manager never tries to download anything.
        chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        try:
            yield chrome
        finally:
            chrome.quit()


_ROWS_JS = """
return Array.from(document.querySelectorAll(arguments[0] + " tbody tr")).map((tr) => ({
  cells: Array.from(tr.cells).map((td) => td.innerText.replace(/\\s+/g, " ").trim()).join(" | "),
  namespace: tr.dataset.namespace || "", state: tr.dataset.state || ""}));
"""


def rows(driver: WebDriver, table: str) -> list[dict[str, str]]:
    # One script call reads the table atomically: the page re-renders it on every refresh.
    result: list[dict[str, str]] = driver.execute_script(_ROWS_JS, f"#{table}")
    return result


def wait_rows(driver: WebDriver, table: str, count: int) -> list[dict[str, str]]:
    until_sync(lambda: len(driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")) == count,
               f"{count} rows in #{table}", step=0.05)
    return rows(driver, table)


def check_page(driver: WebDriver, url: str, mesh: list[SimReplica]) -> None:
    """The whole operator walk-through, synchronous (Selenium), run in a worker thread."""
    driver.get(url)
    replicas = wait_rows(driver, "replicas", 3)
    for replica, row in zip(mesh, replicas, strict=True):
        assert replica.pod_name in row["cells"] and "1.30.3" in row["cells"] and "SERVING" in row["cells"]
        assert row["cells"].endswith(f"| {len(replica.proxies)}")
    proxies = wait_rows(driver, "proxies", 24)
    assert {r["state"] for r in proxies} == {"SYNCED", "ERROR", "STALE", "NOT SENT"}
    assert driver.find_element(By.ID, "readiness").text == "ready"
    assert "(24 of 24)" in driver.find_element(By.ID, "proxy-count").text

    Select(driver.find_element(By.ID, "namespace")).select_by_value("ns-1")
    in_ns1 = sum(p.namespace == "ns-1" for r in mesh for p in r.proxies)
    shown = wait_rows(driver, "proxies", in_ns1)
    assert {r["namespace"] for r in shown} == {"ns-1"}
    assert "namespace=ns-1" in driver.current_url

    Select(driver.find_element(By.ID, "namespace")).select_by_value("")
    Select(driver.find_element(By.ID, "state")).select_by_value("STALE")
    assert {r["state"] for r in wait_rows(driver, "proxies", 2)} == {"STALE"}
    Select(driver.find_element(By.ID, "state")).select_by_value("")
    wait_rows(driver, "proxies", 24)

    driver.execute_script("document.activeElement.blur()")  # no focus ring on the last-used filter
    # The whole page in one picture: the window grows by what the content overflows the viewport.
    overflow = driver.execute_script("return document.documentElement.scrollHeight - window.innerHeight")
    driver.set_window_size(1440, 900 + max(0, int(overflow)))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT))


async def test_status_page_renders_mesh_filters_and_screenshot(browser: WebDriver) -> None:
    mesh = demo_mesh()
    async with stack(mesh=mesh, identity=True, admin_listen=ANY_PORT, admin_status_page=True) as s:
        url = f"http://127.0.0.1:{s.proxy.admin_port}/"
        await asyncio.to_thread(check_page, browser, url, mesh)
        assert SCREENSHOT.stat().st_size > 10_000

        # Auto-refresh: a replica that starts failing shows up without a reload.
        mesh[2].faults.fail_code = grpc.StatusCode.UNAVAILABLE

        def shows_error() -> None:
            until_sync(lambda: "ERROR" in rows(browser, "replicas")[2]["cells"], "replica 2 shown in ERROR", step=0.05)
            assert "UNAVAILABLE" in rows(browser, "replicas")[2]["cells"]
            wait_rows(browser, "proxies", 24 - len(mesh[2].proxies))

        await asyncio.to_thread(shows_error)


async def test_proxy_names_are_text_never_markup(browser: WebDriver) -> None:
    mesh = make_mesh(1, 2, tokens=TOKENS)
    mesh[0].proxies.append(SimProxy('<img src=x onerror="document.title=1">', "ns-0", states={"CDS": "SYNCED"}))
    async with stack(mesh=mesh, identity=True, admin_listen=ANY_PORT, admin_status_page=True) as s:
        def check() -> None:
            browser.get(f"http://127.0.0.1:{s.proxy.admin_port}/")
            shown = wait_rows(browser, "proxies", 3)
            assert any('<img src=x onerror="document.title=1">' in r["cells"] for r in shown)
            assert not browser.find_elements(By.CSS_SELECTOR, "#proxies img")
            assert browser.title == "istioctl-proxy status"

        await asyncio.to_thread(check)


async def test_status_api_shape() -> None:
    mesh = demo_mesh()
    async with (stack(mesh=mesh, identity=True, admin_listen=ANY_PORT, admin_status_page=True) as s,
                aiohttp.ClientSession() as http):
        base = f"http://127.0.0.1:{s.proxy.admin_port}"
        async with http.get(f"{base}/api/status") as response:
            assert response.status == 200
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            data = await response.json()
        assert [r["istiod"] for r in data["replicas"]] == ["istiod-0", "istiod-1", "istiod-2"]
        assert {r["version"] for r in data["replicas"]} == {"1.30.3"}
        assert [r["proxies"] for r in data["replicas"]] == [8, 8, 8]
        assert data["namespaces"] == ["ns-0", "ns-1", "ns-2", "ns-3"]
        assert data["types"] == ["CDS", "LDS", "EDS", "RDS"]
        by_id = {p["id"]: p for p in data["proxies"]}
        holder, erroring = next((r, p) for r in mesh for p in r.proxies if p.states["LDS"] == "ERROR")
        assert by_id[erroring.id]["types"]["LDS"] == "ERROR"
        assert by_id[erroring.id]["state"] == "ERROR"
        assert by_id[erroring.id]["errors"]["LDS"] == "simulated NACK"
        assert by_id[erroring.id]["istiod"] == holder.pod_name

        # Another name for 127.0.0.1 is refused: a DNS-rebinding page cannot read the mesh through a browser.
        async with http.get(f"{base}/api/status", headers={"Host": f"attacker.example:{s.proxy.admin_port}"}) as r:
            assert r.status == 421
        async with http.get(f"{base}/api/status", headers={"Host": f"localhost:{s.proxy.admin_port}"}) as r:
            assert r.status == 200
