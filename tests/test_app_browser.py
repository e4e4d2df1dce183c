"""interp app end to end: `streamlit run` on a free local port, driven by Playwright in Debian's Chromium
(scripts/install_browser.sh installs it; without it the test is skipped and says why)."""

from __future__ import annotations

import pytest

from app.browser import IMAGES, PLOTLY, browser, chromium_missing, open_page, serve

MISSING = chromium_missing()  # checked before the run is built: a missing browser costs nothing
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def test_feature_page_renders_heatmaps_and_charts_in_a_browser(shapes_run, tmp_path):
    from interp.shapes.concepts import load_recovery

    feature = max(load_recovery(shapes_run / "recovery.json").concepts, key=lambda c: c.f1).feature
    with serve(shapes_run) as url, browser(height=1600) as page:
        open_page(page, f"{url}/feature?feature={feature}", (IMAGES, PLOTLY))
        assert page.locator("h1").first.inner_text().startswith(f"Feature {feature}")
        images = page.locator(IMAGES)
        assert images.count() >= 3
        sizes = images.evaluate_all("els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        assert all(done and w >= 96 and h >= 96 for done, w, h in sizes), sizes  # upscaled heatmap overlays
        assert page.locator(PLOTLY).count() >= 2 and page.locator(f"{PLOTLY} .main-svg").count() >= 2
        assert page.get_by_text("Traceback").count() == 0 and page.locator("[data-testid='stException']").count() == 0
        page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)
        page.get_by_role("link", name="Feature list").click()  # the navigation works from the page
        page.wait_for_url("**/features", timeout=60_000)
        page.get_by_role("heading", name="Feature list").wait_for(timeout=60_000)
        open_page(page, url, (PLOTLY,))
        assert page.locator(PLOTLY).count() >= 3 and page.locator("h1").first.inner_text() == "Overview"
    assert (tmp_path / "feature.png").stat().st_size > 10_000


def test_the_url_follows_navigation_unknown_paths_land_on_the_overview_and_nothing_is_fetched_elsewhere(shapes_run):
    requests: list[str] = []
    with serve(shapes_run) as url, browser(height=1600) as page:
        page.on("request", lambda r: requests.append(r.url))
        open_page(page, f"{url}/feature?feature=3", (IMAGES, PLOTLY))

        def shown(feature: str) -> tuple[str, str]:
            """(the URL's query, the page's title) once the page has caught up with the URL (or timed out)."""
            try:
                page.wait_for_function("f => (document.querySelector('h1') || {}).innerText?.startsWith('Feature ' + f)"
                                       " && !document.querySelector('[data-testid=\"stStatusWidget\"]')", arg=feature,
                                       timeout=60_000)
            except Exception:  # the assertion below says what the page shows instead
                pass
            return page.url.split("?")[-1], page.locator("h1").first.inner_text().split(" · ")[0]

        link = page.locator("[data-testid='stPageLink'] a").first  # a nearest feature
        target = link.inner_text().split(" · ")[0].split()[-1]
        link.click()
        page.wait_for_url(f"**/feature?feature={target}", timeout=60_000)
        assert shown(target) == (f"feature={target}", f"Feature {target}")
        box = page.locator("input[type='number']").first
        box.fill("5")
        box.press("Enter")
        page.wait_for_url("**/feature?feature=5", timeout=60_000)
        assert shown("5") == ("feature=5", "Feature 5")
        page.go_back()
        page.wait_for_url(f"**/feature?feature={target}", timeout=60_000)
        assert shown(target) == (f"feature={target}", f"Feature {target}")
        for path in ("overview", "no-such-page"):
            open_page(page, f"{url}/{path}", (PLOTLY,))
            assert page.locator("h1").first.inner_text() == "Overview" and "Page not found" not in page.content()
    elsewhere = sorted({r for r in requests if not r.startswith((url, "data:", "blob:"))})
    assert requests and not elsewhere, elsewhere
