"""The HTML report, opened in a real browser (headless Chromium, Debian's package, no network): every image in
the page loads, and its tables hold test_stats.json's numbers. The screenshot is kept for people to look at."""

import html.parser
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
# Appended to a copy of the page (the report itself has no script): after load, each image's state into the DOM.
CHECK = ('<script>addEventListener("load", () => {const p = document.createElement("pre"); p.id = "cvtk-check";'
         'p.textContent = [...document.images].map(i => i.complete && i.naturalWidth > 0 ? "ok" : "broken")'
         '.join(" "); document.body.appendChild(p)})</script></body>')


def chromium():
    found = shutil.which("chromium")
    if not found:  # a fresh machine: Debian's package, as in the CI image
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(cmd, env=env, capture_output=True, check=True)
        found = shutil.which("chromium")
    # No network for the browser: a proxy that does not exist, and no background services.
    return [found, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--proxy-server=127.0.0.1:9", "--disable-background-networking", "--no-first-run"]


def image_states(browser, page, tmp_path):
    check = tmp_path / ("check-" + page.name)
    check.write_text(page.read_text().replace("</body>", CHECK))
    dom = subprocess.run([*browser, "--virtual-time-budget=5000", "--dump-dom", check.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    start = dom.index('<pre id="cvtk-check">') + len('<pre id="cvtk-check">')
    return dom[start:dom.index("</pre>", start)].split()


class Tables(html.parser.HTMLParser):
    """Every table of a page as rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_the_report_opens_in_a_browser_with_every_image_and_the_stats_numbers(shapes_model, tmp_path):
    from tests import synthetic

    label, weights = shapes_model
    test = synthetic.write(tmp_path / "test", 4, (256, 256), 8, (8, 14), seed=7)
    result = run_cli("inference", "--label", label, "--data", test, "--model_weights", weights, "--output",
                     tmp_path / "pred", "--score_threshold", "0", "--device", "cpu", "--num_workers", "1", "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("evaluate", "--gt", test, "--pred", tmp_path / "pred" / "instances.json", "--output",
                     tmp_path / "stats.json", "--report", tmp_path / "report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    page = tmp_path / "report.html"
    text = page.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text  # nothing to fetch or run
    stats = json.loads((tmp_path / "stats.json").read_text())

    browser = chromium()
    states = image_states(browser, page, tmp_path)
    # 4 plots (PR curves, confusion, counts) + 4 gallery pairs; every one decoded by the browser.
    assert states == ["ok"] * 11, states
    broken = tmp_path / "broken.html"  # the check itself sees a broken image
    broken.write_text(text.replace("base64,iVBOR", "base64,AAAA", 1))
    assert "broken" in image_states(browser, broken, tmp_path)

    parser = Tables()
    parser.feed(text)
    metrics, per_class, confusion, counts = parser.tables[1:5]
    keys = list(stats["stats"])
    assert metrics[0][1:] == keys
    assert metrics[1] == ["all", *(f"{v:.4f}" for v in stats["stats"].values())]
    for row in metrics[2:]:
        assert row[1:] == [f"{stats['class_stats'][row[0]][k]:.4f}" for k in keys]
    for row in per_class[1:]:
        best = stats["best_f1"][row[0]]
        assert row[1:] == [f"{best[k]:.4f}" for k in ("threshold", "precision", "recall", "f1")] + \
            [str(best["objects"]), str(best["detections"])]
    labels = stats["confusion_matrix"]["labels"]
    assert [r[0] for r in confusion[1:]] == labels
    assert [[int(v) for v in r[1:]] for r in confusion[1:]] == stats["confusion_matrix"]["counts"]
    for row in counts[1:]:
        errors = stats["counts"]["per_class"][row[0]]
        assert row[1:] == [f"{errors[k]:.4f}" for k in ("mae", "rmse", "r2")]

    shot = tmp_path / "report.png"
    subprocess.run([*browser, "--window-size=1280,3800", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert shot.stat().st_size > 50_000  # a page with plots and pictures, not a blank one
