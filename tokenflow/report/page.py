"""The report page: one HTML file with inline CSS and a few lines of JS (a sortable table), whose images
are data URIs or files in a folder beside it, so it opens offline."""
from __future__ import annotations

import datetime
import html
import math

from tokenflow import __version__
from tokenflow.metrics.names import NUMBERS

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a202c;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:15px;margin:0 0 6px}
.meta{color:#4a5568;font-size:12px} .plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.plots img{border:1px solid #e2e8f0;border-radius:4px;max-width:100%}
table{border-collapse:collapse;font-size:13px} th,td{padding:4px 10px;border-bottom:1px solid #e2e8f0;text-align:left}
th{background:#f7fafc;cursor:pointer;user-select:none;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
.item{border:1px solid #e2e8f0;border-radius:6px;padding:14px;margin:16px 0}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start} .row table{margin-top:4px}
.label{font-size:11px;color:#718096} .failed{color:#c53030} .prompt{font-style:italic}
.warn{background:#fffbea;border:1px solid #f6e05e;padding:6px 10px;border-radius:4px;font-size:12px}
"""
# Click a header to sort by it; numbers sort as numbers, empty cells last.
JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=!th.classList.contains('sorted-asc'),b=t.tBodies[0],rows=Array.from(b.rows);
  rows.sort(function(x,y){var a=x.cells[i].dataset.v,c=y.cells[i].dataset.v;
   if(a===''||c==='')return (a==='')-(c==='');var p=parseFloat(a),q=parseFloat(c);
   var r=(isNaN(p)||isNaN(q))?a.localeCompare(c):p-q;return asc?r:-r;});
  rows.forEach(function(r){b.appendChild(r)});t.querySelectorAll('th').forEach(function(h){h.className=''});
  th.className=asc?'sorted-asc':'sorted-desc';});});});
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


def _td(v, num: bool = False) -> str:
    sort = "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return f'<td{" class=num" if num else ""} data-v="{esc(sort)}">{esc(fmt(v))}</td>'


def _img(src: str | None, alt: str) -> str:
    return f'<img src="{esc(src)}" alt="{esc(alt)}">' if src else ""


def summary_table(items: list[dict], keys: list[str]) -> str:
    head = ["item", "prompt", "status", "frames", "size", "edit s", "s / frame"] + keys
    rows = []
    for it in items:
        total = it["edit_seconds"]
        per = total / it["frames"] if total is not None and it.get("frames") else None
        size = "x".join(map(str, it["size"])) if it.get("size") else ""
        cells = [f'<td data-v="{esc(it["name"])}"><a href="#{esc(it["anchor"])}">{esc(it["name"])}</a></td>',
                 _td(it.get("prompt") or ""), _td(it["status"]), _td(it.get("frames"), True), _td(size),
                 _td(total, True), _td(per, True)]
        cells += [_td(it["metrics"].get(k), True) for k in keys]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    titles = {k: NUMBERS[k][1] for k in keys}
    ths = "".join(f'<th title="{esc(titles.get(h, ""))}">{esc(h)}</th>' for h in head)
    return f'<table class="sortable"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _kv_table(d: dict, unit: str = "") -> str:
    return "<table>" + "".join(f'<tr><td>{esc(k)}</td><td class=num>{esc(fmt(v))}{unit}</td></tr>'
                               for k, v in d.items()) + "</table>"


def item_section(it: dict) -> str:
    status = f'<span class="failed">{esc(it["status"])}</span>' if it["status"] == "failed" else esc(it["status"])
    parts = [f'<div class="item" id="{esc(it["anchor"])}"><h3>{esc(it["name"])} <span class="meta">({status})</span></h3>']
    if it.get("prompt"):
        parts.append(f'<div class="prompt">&ldquo;{esc(it["prompt"])}&rdquo;</div>')
    if it.get("error"):
        parts.append(f'<div class="failed">{esc(it["error"])}</div>')
    if it.get("problem"):
        parts.append(f'<div class="warn">pictures unavailable: {esc(it["problem"])}</div>')
    parts.append('<div class="row">')
    if it.get("strip"):
        rows = "source (top) | edit (bottom)" if it.get("has_source") else "edit"
        parts.append(f'<div><div class="label">{rows}, frames spread over the clip</div>{_img(it["strip"], "strip")}</div>')
    if it.get("gif"):
        parts.append(f'<div><div class="label">preview{" (source | edit)" if it.get("has_source") else ""}</div>'
                     f'{_img(it["gif"], "preview")}</div>')
    if it["metrics"]:
        parts.append(f'<div><div class="label">metrics</div>{_kv_table(it["metrics"])}</div>')
    if it.get("seconds"):
        parts.append(f'<div><div class="label">time per stage</div>{_kv_table(it["seconds"], " s")}</div>')
    parts.append("</div></div>")
    return "".join(parts)


def page(items: list[dict], plots: dict[str, str | None], title: str, notes: list[str]) -> str:
    keys = [k for k in NUMBERS if any(k in it["metrics"] for it in items)]
    done = sum(it["status"] in ("done", "ok") for it in items)
    failed = sum(it["status"] == "failed" for it in items)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    plot_html = "".join(_img(src, alt) for alt, src in plots.items() if src)
    defs = "".join(f"<li><b>{esc(k)}</b>: {esc(NUMBERS[k][1])}</li>" for k in keys)
    warn = "".join(f'<p class="warn">{esc(n)}</p>' for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head><body>
<h1>{esc(title)}</h1>
<div class="meta">{len(items)} item(s): {done} done, {failed} failed &middot;
written {esc(when)} by tokenflow {esc(__version__)}</div>
{warn}
<h2>Overview</h2><div class="plots">{plot_html or '<span class="meta">no timings or metrics to plot</span>'}</div>
<h2>Summary</h2><div class="meta">click a column to sort</div>{summary_table(items, keys)}
{f'<ul class="meta">{defs}</ul>' if defs else ''}
<h2>Items</h2>{''.join(item_section(it) for it in items)}
<script>{JS}</script></body></html>
"""
