"""Small, dependency-free HTML building blocks for the report (every value is escaped)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dee7; --bg:#ffffff; --soft:#f4f6fa; --accent:#7a2a6f; --ok:#1f7a3d; --warn:#9a6200; --bad:#a4262c; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color:var(--fg); background:var(--bg); }
header { background:linear-gradient(90deg,#4b1d47,#7a2a6f); color:#fff; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:600; }
header p { margin:0; opacity:.9; font-size:13px; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; white-space:nowrap; }
main { max-width:1240px; margin:0 auto; padding:8px 32px 48px; }
section { border-bottom:1px solid var(--line); padding:12px 0 22px; }
h2 { font-size:20px; margin:18px 0 8px; color:#3a1737; }
h3 { font-size:16px; margin:18px 0 6px; }
h4 { font-size:14px; margin:12px 0 4px; color:var(--muted); }
p.lead { color:var(--muted); margin:4px 0 12px; max-width:980px; }
.note { background:var(--soft); border-left:4px solid var(--accent); padding:8px 12px; margin:10px 0; font-size:13.5px; max-width:980px; }
.missing { background:#fff8e6; border-left:4px solid var(--warn); padding:8px 12px; margin:10px 0; font-size:13.5px; }
.error { background:#fdecec; border-left:4px solid var(--bad); padding:8px 12px; margin:10px 0; font-size:13.5px; }
table { border-collapse:collapse; margin:8px 0 14px; font-size:13px; }
th, td { border:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
th { background:var(--soft); font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr:nth-child(even) td { background:#fbfcfe; }
.na { color:var(--muted); font-style:italic; }
.best { font-weight:700; color:var(--ok); }
.badge { display:inline-block; padding:0 6px; border-radius:8px; font-size:12px; background:var(--soft); border:1px solid var(--line); }
.badge.ok { color:var(--ok); border-color:#b7dcc3; background:#eef8f1; }
.badge.bad { color:var(--bad); border-color:#efc1c3; background:#fdf1f1; }
.badge.warn { color:var(--warn); border-color:#ecd49d; background:#fff8e6; }
.grid { display:flex; flex-wrap:wrap; gap:14px; }
figure { margin:0; }
figure img { display:block; border:1px solid var(--line); background:#fff; }
figcaption { font-size:12px; color:var(--muted); max-width:100%; margin-top:3px; }
.bag { display:flex; gap:10px; align-items:flex-start; margin:10px 0 20px; overflow-x:auto; }
.bag figure { flex:0 0 auto; }
.pf-row { display:flex; flex-wrap:wrap; gap:10px; align-items:flex-start; border-top:1px solid var(--line); padding:8px 0; }
.pf-row > p { flex:0 0 100%; margin:0; }
.muted { color:var(--muted); font-size:12px; }
.bag figcaption { font-size:11.5px; color:var(--fg); line-height:1.35; }
.bag figcaption b { color:var(--accent); }
.kw { font-size:12.5px; color:var(--muted); margin:-6px 0 4px; }
.scroll { overflow-x:auto; }
footer { max-width:1240px; margin:0 auto; padding:16px 32px 40px; color:var(--muted); font-size:12.5px; }
code { background:var(--soft); padding:0 4px; border-radius:3px; font-size:12.5px; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to text for tables (floats rounded, None/NaN as a dash)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def na(reason: str = "", text: str = "n/a") -> str:
    """An italic "n/a" whose tooltip says why."""
    return f'<span class="na" title="{esc(reason)}">{esc(text)}</span>'


def badge(text: str, kind: str = "") -> str:
    return f'<span class="badge {esc(kind)}">{esc(text)}</span>'


def missing(text: str) -> str:
    """A box saying which input is not there yet (and how to make it)."""
    return f'<div class="missing">{text}</div>'


def note(text: str) -> str:
    return f'<div class="note">{text}</div>'


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False, numeric: Sequence[int] = ()) -> str:
    """An HTML table. Cells are escaped unless ``raw`` (then they are trusted HTML);
    columns whose index is in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{cell if raw else esc(fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def img(src: str, width: int | None = None, alt: str = "") -> str:
    w = f' width="{int(width)}"' if width else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{w} loading="lazy">'


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of facts (no header); values are escaped."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def figure(src: str, caption: str = "", width: int | None = None, alt: str = "", style: str = "") -> str:
    """An image with a caption (``caption`` is trusted HTML)."""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    st = f' style="{esc(style)}"' if style else ""
    return f"<figure{st}>{img(src, width, alt or caption)}{cap}</figure>"


def section(anchor: str, title: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{lead_html}{body}</section>'


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str], footer: str) -> str:
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{subtitle}</p></header><nav>{links}</nav>"
        f"<main>{''.join(sections)}</main><footer>{footer}</footer></body></html>\n"
    )
