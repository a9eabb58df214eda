"""JSON Lines input (the format OpenAI-compatible finetuning services take): *.jsonl and *.json files with one
JSON object per line, plain or gzip-compressed (*.gz), local or in object storage.

Every line becomes exactly one row: its row id is `<file>:<line>` (1-based, as editors number lines), and a
line that is not a JSON object is an error row carrying its reason (JSON_ERROR) and its exact bytes
(RAW_LINE); it is never dropped. Blank lines are not rows. Top-level keys become columns; a column whose
values Arrow cannot give one type (a string in one line, a list in another) is kept as JSON text, which the
renderer accepts for the messages column. Pure pyarrow + json: no Ray, no torch.
"""
from __future__ import annotations

import json
from typing import IO, Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from gradshield_ray.tables import JSON_ERROR, RAW_LINE, ROW_ID

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_REASON_LEN = 80  # bytes of a bad line quoted in its reason (the whole line is kept in RAW_LINE)


class JsonlFileError(ValueError):
    """A whole file cannot be read (a corrupt gzip stream): its rows are unknown, so the run must fail."""


def is_jsonl(path: str) -> bool:
    return path.endswith(SUFFIXES)


def _parse(line: bytes, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, the reason this line is not a row)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; the file looks like one JSON array or a pretty-printed object: write one object per line"
                if text.strip() in ("[", "{", "]", "}", "],", "},") else "")
        shown = text.strip()[:_REASON_LEN]
        return None, f"{where}: not valid JSON ({e.msg} at column {e.colno}): {shown!r}{hint}"
    if not isinstance(obj, dict):
        return None, f"{where}: a JSON {type(obj).__name__}, not an object like {{\"messages\": [...]}}"
    return obj, None


def _column(values: list[Any], nested_as_json: bool = False) -> pa.Array:
    """Arrow's own type for the values, or JSON text when they have no common type (or, with
    nested_as_json, whenever they are lists or objects: one schema for files of any shape)."""
    if nested_as_json and any(isinstance(v, (list, dict)) for v in values):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())


def parse_lines(lines: Iterable[bytes], rel: str, required: Sequence[str] = (), nested_as_json: bool = False
                ) -> pa.Table:
    """One row per non-blank line: the object's keys as columns, plus ROW_ID, JSON_ERROR and RAW_LINE.
    `required` columns exist even when no line has them (null: each such row is an error row with a reason,
    not a file that fails the run)."""
    objs: list[dict[str, Any]] = []
    ids, errors, raws = [], [], []
    keys: dict[str, None] = dict.fromkeys(required)
    for n, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        obj, err = _parse(line, f"{rel} line {n}")
        objs.append(obj or {})
        keys.update(dict.fromkeys(obj or ()))
        ids.append(f"{rel}:{n}")
        errors.append(err)
        raws.append(bytes(line) if err else None)
    clash = [k for k in keys if k.startswith("gs_")]
    if clash:
        raise JsonlFileError(f"{rel}: key(s) {clash} clash with the gs_* columns gradshield_ray writes")
    cols = {k: _column([o.get(k) for o in objs], nested_as_json) for k in keys}
    cols[ROW_ID] = pa.array(ids, pa.string())
    cols[JSON_ERROR] = pa.array(errors, pa.string())
    cols[RAW_LINE] = pa.array(raws, pa.binary())
    return pa.table(cols)


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _open(fs: pafs.FileSystem, path: str, rel: str):
    try:
        return fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)
    except pa.ArrowInvalid as e:
        raise JsonlFileError(f"{rel}: not a readable gzip file ({e})") from None


def _read(f: IO[bytes], rel: str) -> bytes:
    try:
        return bytes(f.read())
    except (OSError, EOFError, pa.ArrowInvalid) as e:
        raise JsonlFileError(f"{rel}: cannot be read ({type(e).__name__}: {e}); is the gzip file truncated?"
                             ) from None


def count_rows(fs: pafs.FileSystem, path: str, rel: str) -> int:
    """How many rows read_file will give (non-blank lines): the runner's unit size, known before reading."""
    with _open(fs, path, rel) as f:
        return sum(1 for line in _lines(_read(f, rel)) if line.strip())


def read_stream(f: IO[bytes], rel: str, required: Sequence[str] = (), nested_as_json: bool = False) -> pa.Table:
    """All rows of one open (already decompressed) file."""
    return parse_lines(_lines(_read(f, rel)), rel, required, nested_as_json)


def read_file(fs: pafs.FileSystem, path: str, rel: str, required: Sequence[str] = (),
              nested_as_json: bool = False) -> pa.Table:
    """One JSONL file from any pyarrow filesystem; *.gz is decompressed."""
    with _open(fs, path, rel) as f:
        return read_stream(f, rel, required, nested_as_json)
