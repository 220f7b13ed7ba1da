"""The page in a real headless Chromium (Debian's package, driven by Playwright): type the token
and a prompt, watch the candidates arrive, check the best image is shown and downloadable; and
resume a search that a stopped service interrupted."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_service_harness import FAKE_REQUEST, TOKEN, FakeBackend, client, fake_config, serve

CHROMIUM_ENV = "DIFFSEARCH_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
HOW_TO_GET_IT = (f"apt-get install chromium, set {CHROMIUM_ENV} to a Chromium binary, or run "
                 "`bash scripts/test`, which installs it")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str:
    """The Chromium to drive: ``$DIFFSEARCH_CHROMIUM``, else ``chromium`` or ``chromium-browser``
    on PATH. The page test is part of the suite, so a machine without one fails it (one line
    saying how to get one) rather than skipping it."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail(f"{CHROMIUM_ENV}={configured} is not an executable file: point it at a "
                        "Chromium binary, or unset it to use chromium on PATH", pytrace=False)
        return configured
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"no Chromium ({CHROMIUM_ENV} is unset and neither {' nor '.join(CHROMIUM_NAMES)}"
                f" is on PATH): {HOW_TO_GET_IT}", pytrace=False)


def test_submit_on_the_page_and_see_the_best_image(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = find_chromium()

    config = replace(fake_config(tmp_path), batch_size=1)  # one progress event per candidate
    with serve(config, FakeBackend(delay=0.02)) as url, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        expect(page.locator("#auth-state")).to_have_text("token needed")

        page.fill("#token", TOKEN)
        page.click("#token-form button")
        expect(page.locator("#auth-state")).to_have_text("token accepted")
        assert page.evaluate("sessionStorage.getItem('diffsearch-token')") == TOKEN

        page.fill("#prompt", "a red circle on the left")
        page.select_option("#verifier", "redness")
        page.fill("#budget", "12x")
        page.click("#submit")

        expect(page.locator("#status")).to_have_text("done", timeout=60_000)
        download = page.locator(".download")
        expect(download).to_be_visible()
        expect(page.locator(".tile")).to_have_count(12)
        expect(page.locator(".tile.best")).to_have_count(1)
        best = page.locator(".best-image")
        expect(best).to_have_attribute("data-candidate", str(_best_candidate(url)))
        assert page.evaluate("document.querySelector('.best-image').naturalWidth") == 8
        plotted = page.evaluate(
            "(() => { const c = document.querySelector('.plot');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0) n++;"
            " return n; })()")
        assert plotted > 200  # axes, labels and the step line were drawn
        expect(page.locator("#nfe")).to_have_text("120 / 120 NFE")
        assert download.get_attribute("download").endswith("-best.png")

        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_resume_an_interrupted_search_on_the_page(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = find_chromium()
    # threads=7: a runtime spec of its own (a slow fake: 0.1 s per denoise call, one candidate
    # of 10 steps per work unit), so stopping the service lands mid-search
    config = replace(fake_config(tmp_path, threads=7), batch_size=1)
    with serve(config, FakeBackend(delay=0.1)) as url, client(url) as http:
        finished = http.post("/v1/searches", json={**FAKE_REQUEST, "budget": "1x"}).json()["id"]
        stopped = http.post("/v1/searches", json={**FAKE_REQUEST, "budget": "8x"}).json()["id"]
        deadline = time.monotonic() + 60
        while http.get(f"/v1/searches/{stopped}").json()["progress"]["nfe_done"] < 10:
            assert time.monotonic() < deadline, "the search never got going"
            time.sleep(0.02)

    with serve(config, FakeBackend(delay=0.0)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        expect(page.locator("#auth-state")).to_have_text("token accepted")

        page.click(f"#search-list li:has-text('{finished}')")
        expect(page.locator("#status")).to_have_text("done")
        expect(page.locator("#cancel")).to_be_disabled()
        expect(page.locator("#resume")).to_be_hidden()

        page.click(f"#search-list li:has-text('{stopped}')")
        expect(page.locator("#status")).to_have_text("interrupted")
        expect(page.locator("#search-error")).to_contain_text("resume")
        expect(page.locator("#cancel")).to_be_disabled()  # nothing runs
        expect(page.locator("#resume")).to_be_visible()

        page.click("#resume")
        expect(page.locator("#status")).to_have_text("done", timeout=60_000)
        expect(page.locator("#resume")).to_be_hidden()
        expect(page.locator("#cancel")).to_be_disabled()
        expect(page.locator(".tile")).to_have_count(8)  # each candidate once, replayed or new
        expect(page.locator("#nfe")).to_have_text("80 / 80 NFE")
        expect(page.locator(".download")).to_be_visible()
        expect(page.locator(f"#search-list li:has-text('{stopped}')")).to_contain_text("done")
        browser.close()
    assert not errors, errors


def _best_candidate(url: str) -> int:
    with client(url) as http:
        searches = http.get("/v1/searches").json()["searches"]
        detail = http.get(f"/v1/searches/{searches[-1]['id']}").json()
    return int(detail["result"]["prompts"][0]["best"]["candidate"])


def test_a_missing_chromium_fails_in_one_line_saying_how_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHROMIUM_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception) as missing:
        find_chromium()
    message = str(missing.value)
    assert "\n" not in message and "apt-get install chromium" in message
    assert CHROMIUM_ENV in message and "bash scripts/test" in message

    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "no-such-chromium"))
    with pytest.raises(pytest.fail.Exception, match="no-such-chromium is not an executable"):
        find_chromium()


def test_chromium_is_found_by_variable_then_on_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("chromium-browser", "my-chromium"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(CHROMIUM_ENV, raising=False)
    assert find_chromium() == str(tmp_path / "chromium-browser")
    monkeypatch.setenv(CHROMIUM_ENV, str(tmp_path / "my-chromium"))
    assert find_chromium() == str(tmp_path / "my-chromium")
