"""``report.html``: one self-contained page of an evaluation, for reading the results in a browser.

Written beside ``results.json`` from what the other reports already hold — the ``results.json`` content
(:func:`metrics.report.write_reports`), the figures ``curves.png`` and ``overlays.png`` and the
model-randomisation rows — nothing is recomputed. Self-contained: the images are inlined as base64
``data:`` URIs, the style and the sorting script are inline, and the page loads nothing from anywhere,
so it can be mailed, archived or opened offline.

Sections: the summary table (every method x every reported number; click a header to sort, again to
reverse) with the protocol knobs beside it; the mean deletion / insertion curves; the overlay grid
(every method on the same images); the per-method cost (seconds, black-box forwards and backwards per
image); the model-randomisation table when the evaluation ran it.
"""
from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from saliency_lab.metrics.report import SUMMARY_KEYS, _fmt

COST_KEYS = ("seconds_per_image", "forwards_per_image", "backwards_per_image")
# the quality numbers of summary.md's table; its cost columns have their own section here
TABLE_KEYS = tuple(k for k in SUMMARY_KEYS if k not in COST_KEYS) + ("iou_top", "f1_top")
# which way is better, shown next to the column name (costs: lower)
LOWER_IS_BETTER = {"deletion", "deletion_norm", "road_morf", *COST_KEYS}
FIGURES = (("curves.png", "Mean deletion and insertion curves",
            "The explained class's probability as the most salient units are removed (deletion) or revealed "
            "(insertion), averaged over the images; the legend gives each curve's area."),
           ("overlays.png", "Saliency overlays",
            "Every method on the same images: each map min-max normalised per image, jet colours over a grey "
            "copy of the image."))

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.sub { color: #555; margin-bottom: 16px; }
.row { display: flex; gap: 24px; align-items: flex-start; }
.scroll { overflow-x: auto; flex: 0 1 auto; min-width: 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 6px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; font-size: 13px; }
th:first-child, td:first-child { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; background: #f4f4f6; }
table.sortable th:hover { background: #e6e6ea; }
th[data-dir="asc"]::after { content: " \\25B2"; font-size: 10px; }
th[data-dir="desc"]::after { content: " \\25BC"; font-size: 10px; }
dl.knobs { display: grid; grid-template-columns: auto auto; gap: 1px 10px; margin: 0; font-size: 12px;
           background: #f8f8fa; padding: 8px 12px; border-radius: 6px; flex: 0 0 auto; max-width: 300px; }
dl.knobs .title { grid-column: 1 / 3; font-weight: 600; margin-bottom: 4px; }
dl.knobs dt { color: #555; } dl.knobs dd { margin: 0; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.bar { display: inline-block; height: 10px; background: #6b8fd6; vertical-align: middle; margin-right: 6px; }
figure { margin: 0; } figcaption { color: #555; font-size: 13px; margin: 4px 0 8px; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 13px; max-width: 900px; }
"""

# Click a header: sort the body rows by that column (numbers by data-value, empty last), again: reverse.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column], v = cell.getAttribute("data-value");
        return v === null ? cell.textContent.trim() : (v === "" ? null : parseFloat(v));
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return (x === null) - (y === null); }
        var order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
        return dir === "asc" ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(path: Path) -> str:
    """A file as a ``data:`` URI (PNG, SVG or JPEG by suffix)."""
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix]
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _number_cell(value, key: str) -> str:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None
    return f'<td data-value="{"" if number is None else repr(float(number))}">{_e(_fmt(number, key))}</td>'


def _header(key: str) -> str:
    arrow = "↓" if key in LOWER_IS_BETTER else "↑"
    return f'<th title="click to sort">{_e(key)} {arrow}</th>'


def summary_table(methods: Mapping[str, Mapping]) -> str:
    """The sortable method x metric table (``TABLE_KEYS``)."""
    head = '<th title="click to sort">method</th>' + "".join(_header(k) for k in TABLE_KEYS)
    rows = "".join(f'<tr><td>{_e(name)}</td>{"".join(_number_cell(stats.get(k), k) for k in TABLE_KEYS)}</tr>'
                   for name, stats in methods.items())
    return f'<table class="sortable" id="summary"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _flatten(record: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in record.items():
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _knob(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_knob(v) for v in value)
    return json.dumps(value) if isinstance(value, dict) else str(value)


def knobs(results: Mapping) -> str:
    """The protocol and the run's settings as a definition list (every number's context)."""
    settings = {"protocol": results.get("protocol", {}), "seed": results.get("seed"),
                "excluded": results.get("excluded", {})}
    pairs = [(k.removeprefix("protocol.protocol.").removeprefix("protocol."), v) for k, v in _flatten(settings)
             if v is not None]
    body = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_knob(v))}</dd>" for k, v in pairs)
    return f'<dl class="knobs" id="protocol"><div class="title">protocol</div>{body}</dl>'


def cost_table(methods: Mapping[str, Mapping]) -> str:
    """Seconds, forwards and backwards per image, each with a bar relative to the most costly method."""
    largest = {k: max((float(s.get(k) or 0) for s in methods.values()), default=0) for k in COST_KEYS}
    head = '<th title="click to sort">method</th>' + "".join(_header(k) for k in COST_KEYS)
    rows = []
    for name, stats in methods.items():
        cells = []
        for key in COST_KEYS:
            value = stats.get(key)
            width = 0 if not value or not largest[key] else max(1, round(80 * float(value) / largest[key]))
            cell = _number_cell(value, key)
            cells.append(cell.replace(">", f'><span class="bar" style="width:{width}px"></span>', 1))
        rows.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    return f'<table class="sortable" id="cost"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def randomisation_table(rows: Sequence[Mapping]) -> str:
    """Method x fraction of layers randomised -> mean Spearman correlation with the trained model's map."""
    fractions = sorted({float(r["fraction"]) for r in rows if float(r["fraction"]) > 0})
    values = {(r["explainer"], float(r["fraction"])): r["spearman"] for r in rows}
    methods = list(dict.fromkeys(r["explainer"] for r in rows))
    head = '<th title="click to sort">method</th>' + "".join(
        f'<th title="click to sort">{f:.0%} of layers</th>' for f in fractions)
    body = "".join(f"<tr><td>{_e(m)}</td>" + "".join(_number_cell(values.get((m, f)), "spearman") for f in fractions)
                   + "</tr>" for m in methods)
    return (f'<table class="sortable" id="randomisation"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table>")


def render(results: Mapping, figures: Sequence[tuple[str, str, str]] = (), randomisation: Sequence[Mapping] = ()
           ) -> str:
    """The page. ``figures``: (data URI, title, caption) each; ``randomisation``: the check's rows."""
    data = results.get("data", {})
    title = f"{results.get('blackbox', 'black box')} — {results.get('num_images', '?')} images of " \
            f"{data.get('name', 'data')} ({data.get('split', '')})"
    parts = [f"<h1>{_e(title)}</h1>",
             '<div class="sub">saliency-lab evaluation · click a column header to sort · ↑ higher is better, '
             "↓ lower is better</div>",
             '<h2>Summary</h2><div class="row"><div class="scroll">', summary_table(results.get("methods", {})),
             '<p class="note">deletion / insertion: area under the mean probability curve (figure below); mf: raw '
             "M_F (%); mf_normalized: per-image min-max across the methods of this run; mi: precision-recall area "
             "(%) against the ground-truth mask; pointing_game: mean over classes; iou / f1: the map above the "
             "threshold after min-max; iou_top / f1_top: the top fraction of pixels. The protocol is on the "
             "right.</p></div>", knobs(results), "</div>"]
    for uri, heading, caption in figures:
        parts.append(f'<h2>{_e(heading)}</h2><figure><img src="{uri}" alt="{_e(heading)}">'
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts += ["<h2>Cost per image</h2>", cost_table(results.get("methods", {})),
              '<p class="note">seconds: wall time of the method per image on this run\'s hardware; forwards / '
              "backwards: images sent through the black box per explained image.</p>"]
    if randomisation:
        parts += ["<h2>Model randomisation</h2>", randomisation_table(randomisation),
                  '<p class="note">Spearman rank correlation of each map with its map on the trained black box after '
                  "re-initialising the top layers (mean over images); below 0.5: the map depends on the weights.</p>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}<script>{_SCRIPT}</script></body></html>\n")


def write_html_report(results: Mapping, out: str | Path, randomisation: Sequence[Mapping] | None = None) -> Path:
    """Write ``out/report.html`` from ``results`` (the results.json content), the figures found in ``out``
    and the model-randomisation rows (default: ``out/randomisation.json`` when present). Returns its path."""
    out = Path(out)
    if randomisation is None and (out / "randomisation.json").is_file():
        randomisation = json.loads((out / "randomisation.json").read_text())["rows"]
    figures = [(data_uri(out / name), heading, caption) for name, heading, caption in FIGURES
               if (out / name).is_file()]
    path = out / "report.html"
    path.write_text(render(results, figures, randomisation or ()), encoding="utf-8")
    return path
