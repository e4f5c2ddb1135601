"""`dvc plots show` draws every chart offline: the page template in .dvc/config (tools/offline_plots/page.html)
inlines vega, vega-lite and vega-embed instead of loading them from a CDN, as DVC's own page does."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.dvc_project import make_project, run

CHARTS = ("perplexity", "loss", "learning_rate", "grad_norm")  # the vega plots dvc.yaml defines
# anything a browser would fetch by itself: script/img/iframe sources, stylesheets, CSS imports and urls
REMOTE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(\s*["']?\s*(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """A copy of the repo with the committed plot data (metrics and curves live in git): no run needed."""
    return make_project(tmp_path_factory.mktemp("plots"), tiny_model_dir)


def plots_page(project, target) -> str:
    run(project, "dvc", "plots", "show", "-o", str(target))
    return (target / "index.html").read_text(encoding="utf-8")


def test_the_page_references_no_remote_url_where_dvcs_own_does(project, tmp_path):
    page = plots_page(project, tmp_path / "ours")
    assert all(re.search(rf'id\s*=\s*"{chart}"', page) for chart in CHARTS)
    assert not REMOTE.findall(page)
    run(project, "dvc", "config", "--unset", "plots.html_template")
    try:
        assert REMOTE.findall(plots_page(project, tmp_path / "dvcs"))  # DVC's default page loads vega from a CDN
    finally:
        run(project, "git", "checkout", "--", ".dvc/config")


def drawn_charts(page_file) -> dict[str, str]:
    """Each chart's SVG as headless Chromium draws it with every host unresolvable (no network at all)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium here (Debian: apt install chromium)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND"]
        + ["--virtual-time-budget=10000", "--dump-dom", page_file.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    charts = {}
    for chart in CHARTS:
        start = dom.index(f'id="{chart}"')
        end = dom.find("</svg>", start)
        charts[chart] = dom[start:end] if end > 0 else ""
    return charts


def test_every_chart_draws_in_a_headless_browser_with_no_network(project, tmp_path):
    plots_page(project, tmp_path / "page")
    charts = drawn_charts(tmp_path / "page" / "index.html")
    for chart, svg in charts.items():
        assert 'class="marks"' in svg, f"{chart}: not drawn"
    assert charts["perplexity"].count('aria-roledescription="bar"') == 4  # base and fine-tuned, two kinds each
    for chart in ("loss", "learning_rate", "grad_norm"):
        assert 'aria-roledescription="line mark"' in charts[chart], chart
