"""A comparison as one self-contained HTML page: protocol cards, the table, the cost plots and a
gallery of queries where the methods disagree most -- opened from disk, no server, every image
inlined (JPEG data URIs).

The gallery shows, per query, the query crop and each method's top ``top`` images with the
returned box; the frame says how the benchmark judges the image: green a positive, red a
negative, grey junk. Queries are ordered by how much the methods' AP@all differ (their standard
deviation), largest first: where a comparison has something to show.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from instsearch.eval.visualize import GREEN, GREY, RED, YELLOW, _open, _thumb
from instsearch.formats import Benchmark, Run

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.card td { text-align: left; }
.failed { color: #b00; }
td.error { text-align: left; min-width: 30em; }
.query { display: flex; align-items: flex-start; gap: 16px; margin: 14px 0; padding-top: 10px;
         border-top: 1px solid #ddd; }
.methods { display: flex; flex-direction: column; gap: 4px; }
.method { display: flex; align-items: center; gap: 4px; font-size: 12px; }
.method span { width: 150px; }
img { display: block; }
"""


def _data_uri(image: Image.Image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _hit_thumb(bench: Benchmark, hit, gt, size: int, border: int = 3) -> Image.Image:
    thumb, scale, (ox, oy) = _thumb(_open(bench, hit.image), size - 2 * border)
    if hit.box is not None:
        x1, y1, x2, y2 = (v * scale for v in hit.box)
        ImageDraw.Draw(thumb).rectangle([x1 + ox, y1 + oy, x2 + ox, y2 + oy], outline=YELLOW, width=2)
    color = GREY if gt is not None and hit.image in gt.junk else \
        GREEN if gt is not None and hit.image in gt.positives else RED
    return ImageOps.expand(thumb, border=border, fill=color)


def disagreement_order(aps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Query positions by the standard deviation of their AP across methods, largest first
    (ties: the benchmark's order)."""
    if not aps:
        return np.zeros(0, np.int64)
    spread = np.std(np.stack(list(aps.values())), axis=0)
    return np.argsort(-spread, kind="stable")


def gallery(bench: Benchmark, runs: Mapping[str, Run], aps: Mapping[str, np.ndarray], queries: int = 30,
            top: int = 5, size: int = 96) -> str:
    query_ids = [q.id for q in bench.queries]
    parts = []
    for position in disagreement_order(aps)[:queries]:
        q = bench.queries[int(position)]
        gt = bench.ground_truth.get(q.id)
        crop = _open(bench, q.image).crop(tuple(round(v) for v in q.box))
        query_img = ImageOps.expand(_thumb(crop, size - 6)[0], border=3, fill=YELLOW)
        rows = []
        for method, run in runs.items():
            ap = aps[method][query_ids.index(q.id)] if method in aps else float("nan")
            thumbs = "".join(f'<img alt="{html.escape(h.image)}" title="{html.escape(h.image)} {h.score:.3f}" '
                             f'src="{_data_uri(_hit_thumb(bench, h, gt, size))}">'
                             for h in run.rankings.get(q.id, [])[:top])
            rows.append(f'<div class="method"><span>{html.escape(method)}<br>AP {ap:.3f}</span>{thumbs}</div>')
        parts.append(f'<div class="query"><div><img alt="query {html.escape(q.id)}" src="{_data_uri(query_img)}">'
                     f'<small>{html.escape(q.id)}</small></div><div class="methods">{"".join(rows)}</div></div>')
    return "\n".join(parts)


def _seed_table(families: Sequence[dict[str, Any]]) -> str:
    """``seeds.csv``'s rows as one ``mean ± std`` cell per figure."""
    if not families:
        return ""
    keys = list(dict.fromkeys(k[:-5] for f in families for k in f if k.endswith(" mean")))
    rows = [{"method": f["family"], "reranker": f["reranker"], "seeds": f["seeds"],
             **{k: "" if f.get(f"{k} mean") is None else f"{f[f'{k} mean']:.4f}" + (
                 "" if f.get(f"{k} std") is None else f" ± {f[f'{k} std']:.4f}") for k in keys}} for f in families]
    return "<h3>Over seeds (mean ± sample standard deviation)</h3>" + _table(rows, ["method", "reranker", "seeds", *keys])


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            text = "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="{c}">{html.escape(text)}</td>' if c == "error" else f"<td>{html.escape(text)}</td>")
        cls = ' class="failed"' if r.get("status") == "failed" else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


TABLE_COLUMNS = ("method", "reranker", "status", "mAP@10", "mAP@100", "mAP@all", "mIoU", "regions_per_image",
                 "search_ms_per_query", "index_bytes_per_image", "delta_mAP@all", "ci_low", "ci_high",
                 "ci_excludes_0", "vs_plain_delta_mAP@all", "vs_plain_ci_low", "vs_plain_ci_high", "error")


def comparison_html(title: str, benchmarks: Mapping[str, Benchmark], cards: Mapping[str, dict],
                    rows: Sequence[dict[str, Any]], runs: Mapping[str, Mapping[str, Run]],
                    aps: Mapping[str, Mapping[str, np.ndarray]], plots: Mapping[str, Optional[Path]],
                    provenance: str = "", queries: int = 30, top: int = 5, extra_columns: Sequence[str] = (),
                    seeds: Sequence[dict[str, Any]] = ()) -> str:
    """The page: per benchmark its protocol card, table (with the comparison's extra columns),
    the mean ± standard deviation of the methods run with seeds, cost plot and gallery."""
    columns = (*TABLE_COLUMNS[:-1], *extra_columns, TABLE_COLUMNS[-1])
    sections = []
    for name, bench in benchmarks.items():
        card = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in cards.get(name, {}).items())
        plot = plots.get(name)
        sections.append(
            f"<h2>{html.escape(name)}</h2><table class=\"card\">{card}</table>"
            + _table([r for r in rows if r["benchmark"] == name], columns)
            + _seed_table([f for f in seeds if f["benchmark"] == name])
            + (f'<img alt="accuracy against cost" src="{_png_uri(plot)}" style="max-width:100%">' if plot else "")
            + f"<h3>Queries where the methods disagree most (top {top}; frame: green positive, red negative, "
              f"grey junk; yellow box: the returned region)</h3>"
            + gallery(bench, runs.get(name, {}), aps.get(name, {}), queries=queries, top=top))
    sizes = "".join(f'<img alt="{html.escape(key[6:])}: mAP against database size" src="{_png_uri(plot)}">'
                    for key, plot in plots.items() if key.startswith("group:") and plot)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{sizes}{''.join(sections)}"
            f"<p>{html.escape(provenance)}</p></body></html>\n")
