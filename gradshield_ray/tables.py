"""Arrow-level steps shared by the local runner and the Ray pipeline: add score columns, split by τ.

Input columns are never touched: score columns are appended, and filters select whole rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradshield_ray.config import DataConfig
from gradshield_ray.render import Encoded, RenderError, encode_row, required_columns

if TYPE_CHECKING:  # annotations only: the Arrow steps themselves need no torch
    from gradshield_ray.scorer import FIHSScorer

ROW_ID = "gs_row_id"
JSON_ERROR = "gs_json_error"  # JSONL input: why a line is not a row (null on good lines); becomes gs_error
RAW_LINE = "gs_raw_line"  # JSONL input: the exact bytes of such a line (null on good lines)
SCORE_COLUMNS = ("fihs", "gs_n_tokens", "gs_n_loss_tokens", "gs_truncated", "gs_error")
OUR_COLUMNS = (ROW_ID, *SCORE_COLUMNS)
SCORE_SCHEMA = pa.schema([
    ("fihs", pa.float64()),
    ("gs_n_tokens", pa.int32()),
    ("gs_n_loss_tokens", pa.int32()),
    ("gs_truncated", pa.bool_()),
    ("gs_error", pa.string()),
])


class InputSchemaError(ValueError):
    """The input's columns do not fit the configured data layout."""


def check_input_schema(schema: pa.Schema, cfg: DataConfig, where: str) -> None:
    """Fail fast on a missing input column or a clash with the columns this tool adds."""
    missing = [c for c in required_columns(cfg) if c not in schema.names]
    if missing:
        raise InputSchemaError(f"{where}: missing column(s) {missing}; columns are {schema.names}")
    clash = [c for c in OUR_COLUMNS if c in schema.names]
    if clash:
        raise InputSchemaError(f"{where}: input already has column(s) {clash} that gradshield_ray writes")


TOKEN_SCHEMA = pa.schema([("gs_input_ids", pa.list_(pa.int32())), ("gs_loss_mask", pa.list_(pa.bool_()))])


def _decode_rows(table: pa.Table) -> tuple[list[dict | None], list[str | None]]:
    """The rows as Python dicts, and per row the reason it cannot be decoded. Parquet does not enforce
    UTF-8 in string columns; a row whose text is not valid UTF-8 becomes an error row (its bytes are kept
    unchanged in the output) instead of failing the whole batch."""
    try:
        return table.to_pylist(), [None] * table.num_rows
    except UnicodeDecodeError:
        pass
    rows: list[dict | None] = []
    errors: list[str | None] = []
    for i in range(table.num_rows):
        row, err = {}, None
        for name in table.column_names:
            try:
                row[name] = table[name][i].as_py()
            except UnicodeDecodeError as e:
                err = f"invalid UTF-8 in column {name!r} ({e.reason} at byte {e.start})"
                break
        rows.append(None if err else row)
        errors.append(err)
    return rows, errors


def render_table(tokenizer, table: pa.Table, cfg: DataConfig) -> pa.Table:
    """CPU stage: append token ids, loss masks and counts; rows that cannot render get gs_error."""
    rows, decode_errors = _decode_rows(table.select(required_columns(cfg)))
    if JSON_ERROR in table.column_names:  # JSONL lines that are not objects: their reason, their row kept
        decode_errors = [j or d for j, d in zip(table[JSON_ERROR].to_pylist(), decode_errors)]
        rows = [None if j else r for j, r in zip(table[JSON_ERROR].to_pylist(), rows)]
    cols: dict[str, list] = {c: [None] * len(rows) for c in (*TOKEN_SCHEMA.names, *SCORE_SCHEMA.names)}
    for i, row in enumerate(rows):
        if row is None:
            cols["gs_error"][i] = decode_errors[i]
            continue
        try:
            e = encode_row(tokenizer, row, cfg)
        except RenderError as err:
            cols["gs_error"][i] = str(err)
            continue
        cols["gs_input_ids"][i], cols["gs_loss_mask"][i] = e.input_ids, e.loss_mask
        cols["gs_n_tokens"][i], cols["gs_n_loss_tokens"][i] = e.n_tokens, e.n_loss_tokens
        cols["gs_truncated"][i] = e.truncated
    for f in (*TOKEN_SCHEMA, *SCORE_SCHEMA):
        if f.name != "fihs":
            table = table.append_column(f, pa.array(cols[f.name], f.type))
    return table


def score_rendered(scorer: FIHSScorer, table: pa.Table) -> pa.Table:
    """GPU stage: FIHS for every rendered row; a non-finite score becomes an error row (never a 0)."""
    errors = table["gs_error"].to_pylist()
    todo = [i for i, e in enumerate(errors) if e is None]
    ids, masks = table["gs_input_ids"].to_pylist(), table["gs_loss_mask"].to_pylist()
    fihs: list[float | None] = [None] * table.num_rows
    if todo:
        scores = scorer.score_encoded([Encoded(ids[i], masks[i], False) for i in todo])
        for i, s in zip(todo, scores):
            if np.isfinite(s):
                fihs[i] = float(s)
            else:
                errors[i] = f"non-finite score ({s})"
    keep = [c for c in table.column_names if c not in TOKEN_SCHEMA.names and c not in SCORE_SCHEMA.names]
    out = table.select(keep).append_column(SCORE_SCHEMA.field("fihs"), pa.array(fihs, pa.float64()))
    for f in SCORE_SCHEMA:
        if f.name == "fihs":
            continue
        col = pa.array(errors, pa.string()) if f.name == "gs_error" else table[f.name]
        out = out.append_column(f, col)
    return out


def score_table(scorer: FIHSScorer, table: pa.Table, row_ids: list[str] | pa.Array) -> pa.Table:
    """The input table plus gs_row_id and the score columns (fihs null where gs_error is set)."""
    table = table.append_column(ROW_ID, pa.array(row_ids, pa.string()))
    return score_rendered(scorer, render_table(scorer.tokenizer, table, scorer.cfg.data))


def split_table(scored: pa.Table, tau: float) -> dict[str, pa.Table]:
    """kept (fihs ≤ τ), removed (fihs > τ) and errors (no score): every row in exactly one."""
    err = pc.is_valid(scored["gs_error"])
    fihs = scored["fihs"]
    above = pc.fill_null(pc.greater(fihs, pa.scalar(float(tau))), False)
    ok = pc.invert(err)
    return {
        "kept": scored.filter(pc.and_(ok, pc.invert(above))),
        "removed": scored.filter(pc.and_(ok, above)),
        "errors": scored.filter(err),
    }


def finite_scores(scored: pa.Table) -> np.ndarray:
    """The fihs values of scored rows (errors excluded) as float64."""
    col = scored["fihs"]
    return pc.drop_null(col).to_numpy().astype(np.float64) if len(col) else np.empty(0)
