"""The demo in a real browser: headless Chromium, driven by Playwright, sets a class, generates, sees both images.

Slow: it needs a system browser and Playwright (`apt-get install chromium` and `.venv/bin/pip install playwright`;
Playwright's own browser download is not needed). `APP_SCREENSHOT=docs/app.png make test-slow` also writes the
screenshot the README shows.
"""

import os
import shutil
import socket

import pytest

import app

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("No Chromium: install it (`apt-get install chromium`) or name it in $CHROMIUM.")
    return path


def test_the_page_generates_both_images_for_the_class_set_in_it(tmp_path):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("No Playwright: `.venv/bin/pip install playwright` (it drives the system Chromium).")
    demo = app.serve(port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(demo.local_url)
            labels = page.get_by_label("class label(s), comma-separated")
            labels.fill("4, 2")
            page.get_by_role("button", name="Generate").click()
            summary = page.locator("#image-summary")
            expect(summary).to_contain_text("Speedup", timeout=120_000)
            for name in ("full-image", "fast-image"):
                image = page.locator(f"#{name} img")
                expect(image).to_be_visible()
                width = image.evaluate("element => element.naturalWidth")
                assert width == 2 * 128  # the two digits asked for, side by side
            assert "2 image(s)" in summary.inner_text()
            path = os.environ.get("APP_SCREENSHOT") or str(tmp_path / "app.png")
            page.screenshot(path=path, full_page=True)
            browser.close()
    finally:
        demo.close()
    assert os.path.getsize(path) > 10_000
