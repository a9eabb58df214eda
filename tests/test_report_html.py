"""report.html renders: self-contained, the histogram with τ, the evidence in words, counts, and the rows."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa

from gradshield_ray import report_html
from gradshield_ray.config import DataConfig
from gradshield_ray.report import histogram_png
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.tables import ROW_ID, split_table
from gradshield_ray.threshold import ThresholdConfig, decide


class Page(HTMLParser):
    """Collects images, links, scripts, text by element id, and table rows by table id."""

    def __init__(self):
        super().__init__()
        self.imgs, self.external, self.tables, self.text = [], [], {}, {}
        self._table = self._row = self._ids = None
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a and not a[k].startswith("data:"):
                self.external.append(a[k])
        if tag in ("script", "link", "iframe", "object"):
            self.external.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self._row, self._header = [], True
        if tag in ("td", "th") and self._row is not None:
            self._row.append("")
            self._header &= tag == "th"
        self._stack.append(a.get("id") or "")

    def handle_endtag(self, tag):
        if tag == "tr" and self._row and not self._header:  # header rows (all th) are not data
            self.tables[self._table].append(self._row)
        if tag == "tr":
            self._row = None
        if tag == "table":
            self._table = None
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._row is not None and self._row:
            self._row[-1] += data
        for i in self._stack:
            if i:
                self.text[i] = self.text.get(i, "") + data


def scored_table(n_benign=400, n_harm=30, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    fihs = np.concatenate([rng.normal(0, 1, n_benign), rng.normal(12, 1, n_harm)])
    msgs = [[{"role": "user", "content": f"question {i} " + "word " * 100},
             {"role": "assistant", "content": f"answer {i}"}] for i in range(len(fihs))]
    err = [None] * len(fihs)
    err[3] = "column 'messages' is null"
    f = fihs.tolist()
    f[3] = None
    return pa.table({"messages": msgs, ROW_ID: [f"x.parquet:{i}" for i in range(len(fihs))],
                     "fihs": pa.array(f, pa.float64()), "gs_error": pa.array(err, pa.string())})


def test_page_has_figure_evidence_counts_and_rows():
    t = scored_table()
    summary = ScoreSummary.from_values(np.array([v for v in t["fihs"].to_pylist() if v is not None]))
    decision = decide(summary, ThresholdConfig())
    assert decision.evidence["branch"] == "harmful_population"
    parts = split_table(t, decision.tau)
    # two halves merged, as the runners merge per-part samples
    half = t.num_rows // 2
    top = {name: report_html.merge_top(*(report_html.top_rows(split_table(x, decision.tau)[name], DataConfig())
                                         for x in (t.slice(0, half), t.slice(half))))
           for name in ("removed", "kept")}
    counts = {"input": t.num_rows, **{k: v.num_rows for k, v in parts.items()}}
    png = io.BytesIO()
    histogram_png(summary, decision.tau, png)
    page = Page()
    page.feed(report_html.render({"counts": counts, "model": {"path": "m"}}, decision, png.getvalue(),
                                 top["removed"], top["kept"]))
    assert page.external == []  # self-contained: no external asset, no script
    [img] = page.imgs
    assert base64.b64decode(img["src"].removeprefix("data:image/png;base64,")) == png.getvalue()
    assert f"{decision.tau:.6g}" in page.text["tau"]
    assert "posterior is 0.5" in page.text["evidence"] and "Ashman D" in page.text["evidence"]
    assert {k: int(v) for k, v in page.tables["counts"]} == counts
    # the 20 highest removed and the 20 kept closest to τ, ids and scores exactly, text truncated
    rows = {name: parts[name].to_pylist() for name in ("removed", "kept")}
    for name, table_id in (("removed", "removed"), ("kept", "kept-near-tau")):
        want = sorted(rows[name], key=lambda r: -r["fihs"])[:20]
        got = page.tables[table_id]
        assert [r[0] for r in got] == [w[ROW_ID] for w in want]
        assert [float(r[1]) for r in got] == [float(f"{w['fihs']:.6g}") for w in want]
        assert all(len(r[2]) <= report_html.TEXT_CHARS and r[2].startswith("user: question") for r in got)
    assert all(float(r[1]) > decision.tau for r in page.tables["removed"])
    assert all(float(r[1]) <= decision.tau for r in page.tables["kept-near-tau"])


def test_evidence_in_words_for_the_tail_branch_and_simple_policies():
    rng = np.random.default_rng(1)
    s = ScoreSummary.from_values(rng.normal(0, 1, 2000))
    words = " ".join(report_html.explain(decide(s, ThresholdConfig())))
    assert "No separate high-scoring population" in words and "lie above τ" in words
    assert "set by hand" in " ".join(report_html.explain(decide(s, ThresholdConfig(policy="fixed", tau=1.0))))
