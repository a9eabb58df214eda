"""report.html: one self-contained page (inline CSS, the histogram embedded as a base64 PNG, no scripts, no
external assets) for a platform reviewer who decides whether to trust the cut: counts, τ on the histogram,
the threshold's evidence in words, the highest-scoring removed rows, and the kept rows closest to τ.

The row samples are mergeable: each split part contributes its own top rows (top_rows) and the driver
keeps the best of them (merge_top), so no pass over the data is added.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gradshield_ray.config import DataConfig
from gradshield_ray.render import RenderError, row_messages, required_columns
from gradshield_ray.tables import ROW_ID

N_ROWS = 20  # rows shown per table
TEXT_CHARS = 300  # characters of a row's conversation shown


def preview(row: dict[str, Any], cfg: DataConfig, chars: int = TEXT_CHARS) -> str:
    """A row's conversation as one line ("user: … | assistant: …"), cut to `chars` characters."""
    try:
        text = " | ".join(f"{m['role']}: {m['content']}" for m in row_messages(row, cfg))
    except RenderError as e:
        text = f"(cannot render: {e})"
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def top_rows(table: pa.Table, cfg: DataConfig, k: int = N_ROWS) -> list[dict[str, Any]]:
    """The k rows of a scored table with the highest fihs (ties: row id), as {id, fihs, text}. Applied to
    removed rows it gives the most harmful-looking ones; to kept rows, those closest to τ from below."""
    scored = table.filter(pc.is_valid(table["fihs"]))
    if scored.num_rows == 0:
        return []
    idx = pc.select_k_unstable(scored, k, [("fihs", "descending"), (ROW_ID, "ascending")])
    rows = scored.take(idx).select([ROW_ID, "fihs", *required_columns(cfg)]).to_pylist()
    return merge_top([{"id": r[ROW_ID], "fihs": r["fihs"], "text": preview(r, cfg)} for r in rows], [], k)


def merge_top(a: list[dict[str, Any]], b: list[dict[str, Any]], k: int = N_ROWS) -> list[dict[str, Any]]:
    """The k highest-fihs rows of two samples (deterministic order: fihs descending, then id)."""
    return sorted(a + b, key=lambda r: (-r["fihs"], r["id"]))[:k]


def explain(decision) -> list[str]:
    """The threshold's evidence as sentences a reviewer can check."""
    ev, tau = decision.evidence, decision.tau
    n = ev.get("n_rows")
    out = []
    if decision.policy == "fixed":
        out.append(f"τ = {tau:.6g} was set by hand (threshold.policy = fixed).")
    elif decision.policy == "top_fraction":
        frac = ev.get("config", {}).get("fraction")
        out.append(f"τ = {tau:.6g} is the score above which the top {frac} of rows lie (threshold.policy = "
                   "top_fraction; exact to histogram-bin resolution).")
    elif decision.policy == "keep_all":
        out.append("Every scored row is kept (threshold.policy = keep_all).")
    elif ev.get("branch") == "harmful_population":
        comps, sep = ev.get("components") or [{}, {}], ev.get("separation") or {}
        k, h = len(comps), ev.get("harmful_components", 1)
        high = comps[k - h:]
        words = {2: "two", 3: "three"}
        out.append("The scores hold a separate high-scoring minority, so rows above the point where it becomes "
                   "the more likely population are removed (τ is where its posterior is 0.5).")
        out.append(f"A {words.get(k, k)}-component mixture fits better than one with a component fewer by "
                   f"Λ = {ev.get('Lambda', 0):.4g} ({ev.get('Lambda_per_row', 0):.3g} per row); the harmful "
                   f"population ({'the top component' if h == 1 else f'the top {h} components'}) holds "
                   f"{100 * sum(c.get('weight', 0) for c in high):.2f}% of rows from FIHS "
                   f"{high[0].get('mu_raw', float('nan')) if high else float('nan'):.4g} up.")
        if ev.get("canaries"):
            out.append(f"The components are separated (Ashman D = {sep.get('ashman_d', float('nan')):.3g}) and the "
                       "harmful one sits with the harmful calibration canaries, with at most "
                       f"{100 * ev.get('config', {}).get('canary_max_benign_above', 0.1):.0f}% of the benign "
                       "canaries above τ.")
        else:
            out.append(f"The components are separated (Ashman D = {sep.get('ashman_d', float('nan')):.3g}) and the "
                       f"score density dips before the high one (density ratio "
                       f"{sep.get('dip_ratio', float('nan')):.3g}, p = {sep.get('dip_p_value', float('nan')):.3g}, "
                       f"{sep.get('dip_test', '?')} test).")
    else:
        reason = ev.get("reason", "")
        out.append("No separate high-scoring population was found, so only the far tail is removed: rows above "
                   "max(median + 5·robust sd, mean + 5·sd).")
        if reason:
            out.append(f"Why: {reason}.")
    if n is not None and ev.get("expected_removed") is not None:
        out.append(f"{int(ev['expected_removed'])} of {n} scored rows lie above τ.")
    return out


def _table(rows: list[dict[str, Any]], table_id: str, caption: str) -> str:
    body = "".join(f"<tr><td class='id'>{html.escape(str(r['id']))}</td><td class='num'>{r['fihs']:.6g}</td>"
                   f"<td>{html.escape(r['text'])}</td></tr>" for r in rows)
    if not rows:
        body = "<tr><td colspan='3'>(none)</td></tr>"
    return (f"<table id='{table_id}'><caption>{html.escape(caption)}</caption>"
            f"<thead><tr><th>row id</th><th>FIHS</th><th>conversation (truncated)</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;width:100%}td,th{border:1px solid #ccc;padding:.3em .5em;"
       "text-align:left;vertical-align:top;font-size:.9em}td.num{text-align:right;font-family:monospace}"
       "td.id{font-family:monospace;white-space:nowrap}caption{text-align:left;font-weight:bold}"
       "img{max-width:100%}")


def render(report: dict[str, Any], decision, histogram_png: bytes, removed: list[dict[str, Any]],
           kept_near_tau: list[dict[str, Any]]) -> str:
    """The page, from what the run already has: report.json's content, the decision, histogram.png."""
    img = base64.b64encode(histogram_png).decode()
    counts = report.get("counts", {})
    tau = "+∞ (nothing removed)" if math.isinf(decision.tau) else f"{decision.tau:.6g}"
    count_rows = "".join(f"<tr><th>{k}</th><td class='num'>{counts[k]}</td></tr>"
                         for k in ("input", "kept", "removed", "errors") if k in counts)
    words = "".join(f"<li>{html.escape(s)}</li>" for s in explain(decision))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>GradShield review</title>"
        f"<style>{CSS}</style></head><body><h1>GradShield review</h1>"
        f"<p>Model <code>{html.escape(str(report.get('model', {}).get('path', '')))}</code>, "
        f"code {html.escape(str(report.get('code_version', '')))}. Rows with FIHS &gt; τ are removed.</p>"
        f"<h2>Counts</h2><table id='counts'>{count_rows}</table>"
        f"<h2>Threshold</h2><p id='tau'>τ = {html.escape(tau)} (policy {html.escape(decision.policy)})</p>"
        f"<ul id='evidence'>{words}</ul>"
        f"<figure id='histogram'><img alt='FIHS histogram with τ' src='data:image/png;base64,{img}'>"
        f"<figcaption>FIHS of every scored row (log count scale); the red line is τ.</figcaption></figure>"
        f"<h2>Rows</h2>"
        + _table(removed, "removed", f"The {len(removed)} highest-scoring removed rows")
        + _table(kept_near_tau, "kept-near-tau", f"The {len(kept_near_tau)} kept rows closest to τ")
        + "</body></html>"
    )
