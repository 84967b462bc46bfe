"""report.html: written by every evaluate.py run, self-contained, and read in a real headless browser."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_lab.cli import evaluate
from saliency_lab.metrics.report_html import render
from tests.test_evaluate import args_for

METHODS = ["gradient", "rise"]
# the flags that work on this machine (no sandbox as root, no GPU, nothing fetched in the background) and a
# resolver that fails every host name, so anything the page tried to fetch from the network would fail
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]

# Appended to a copy of the report: once the page has loaded, write what the browser sees into the DOM,
# click the deletion header (sort) and twice (reverse), and record the row orders.
PROBE = """<script>
window.addEventListener("load", function () {
  function order(id) {
    return Array.prototype.map.call(document.querySelectorAll("#" + id + " tbody tr"),
                                    function (r) { return r.cells[0].textContent; });
  }
  var images = Array.prototype.slice.call(document.images);
  var result = {
    images: images.length,
    loaded: images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    sizes: images.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
    methods: order("summary"), cost: order("cost"), randomisation: order("randomisation"),
    headers: Array.prototype.map.call(document.querySelectorAll("#summary th"), function (h) { return h.textContent; }),
    fetched: performance.getEntriesByType("resource").map(function (e) { return e.name; })
  };
  var deletion = Array.prototype.filter.call(document.querySelectorAll("#summary th"),
                                            function (h) { return h.textContent.indexOf("deletion") === 0; })[0];
  deletion.click();
  result.ascending = order("summary");
  deletion.click();
  result.descending = order("summary");
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def evaluation(tiny_blackbox_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluation")
    evaluate.main(args_for(f"ckpt:{tiny_blackbox_path}", out, "--randomisation_images=2"))
    return out


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium on this machine: `make test` installs Debian's chromium (apt-get install chromium); "
                    "it could not be installed here")
    return binary


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)


def test_every_evaluation_writes_a_self_contained_report(evaluation):
    page = (evaluation / "report.html").read_text(encoding="utf-8")
    results = json.loads((evaluation / "results.json").read_text())
    for method in METHODS:
        assert f"<td>{method}</td>" in page
    assert "road_morf ↓" in page and "road_lerf ↑" in page and "road_gap ↑" in page  # ROAD's columns, their way
    # nothing to fetch: no external source, link, stylesheet, script or CSS url()
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert references and all(r.startswith("data:") for r in references), [r[:40] for r in references]
    assert "<link" not in page and not re.search(r"<script[^>]+src", page)
    # the figures are the evaluation's own PNGs, inlined byte for byte (reused, not redrawn)
    inlined = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert inlined == [(evaluation / "curves.png").read_bytes(), (evaluation / "overlays.png").read_bytes()]
    # the numbers are results.json's, the protocol knobs beside them, and the randomisation table is there
    assert f'data-value="{float(results["methods"]["rise"]["deletion"])!r}"' in page
    assert 'id="protocol"' in page and "deletion_substrate" in page and 'id="randomisation"' in page
    # without the check, no randomisation section; a name that is HTML stays text
    plain = render({**results, "methods": {"<b>x</b>": results["methods"]["rise"]}})
    assert 'id="randomisation"' not in plain and "&lt;b&gt;x&lt;/b&gt;" in plain and "<b>x</b>" not in plain


def test_report_renders_in_a_headless_browser(evaluation, tmp_path):
    results = json.loads((evaluation / "results.json").read_text())
    probe = tmp_path / "probe.html"
    probe.write_text((evaluation / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    done = _run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page did not finish loading in chromium: {done.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&quot;", '"'))
    assert seen["methods"] == METHODS and seen["cost"] == METHODS and seen["randomisation"] == METHODS
    assert seen["images"] == 2 and seen["loaded"] == 2, seen
    for (width, height), name in zip(seen["sizes"], ("curves.png", "overlays.png")):
        assert (width, height) == Image.open(evaluation / name).size
    assert [h for h in seen["fetched"] if not h.startswith("data:")] == []
    by_deletion = sorted(METHODS, key=lambda m: results["methods"][m]["deletion"])
    assert seen["ascending"] == by_deletion and seen["descending"] == by_deletion[::-1]
    assert any(h.startswith("deletion") for h in seen["headers"])

    screenshot = tmp_path / "report.png"
    shot = _run_chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={screenshot}",
                         (evaluation / "report.html").as_uri())
    assert screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1280) and pixels.std() > 10, "the screenshot is blank"
