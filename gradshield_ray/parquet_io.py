"""Local Parquet listing, reading in row batches, and writing (the I/O edge of the local runner)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


class InputError(ValueError):
    """The input path holds nothing readable."""


def list_parquet(path: str | Path, with_jsonl: bool = False) -> tuple[Path, list[Path]]:
    """(root, files): one file, or every *.parquet (and with_jsonl, every JSON Lines file) under a directory
    (recursive, sorted)."""
    from gradshield_ray.jsonl import is_jsonl

    p = Path(path)
    if p.is_file():
        return p.parent, [p]
    if not p.is_dir():
        raise InputError(f"input {str(p)!r} does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file() and (
        f.suffix == ".parquet" or (with_jsonl and is_jsonl(f.name))))
    if not files:
        raise InputError(f"input {str(p)!r} contains no *.parquet" + (
            " or JSON Lines (*.jsonl, *.json, *.gz) files" if with_jsonl else " files"))
    return p, files


def iter_batches(path: Path, rows: int) -> Iterator[pa.Table]:
    """Row batches of one file as tables, so memory stays bounded whatever the file size."""
    pf = pq.ParquetFile(path)
    for rb in pf.iter_batches(batch_size=rows):
        yield pa.Table.from_batches([rb])


def write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # a file that exists is a whole file


def read_column(files: list[Path], column: str) -> Iterator[pa.ChunkedArray]:
    for f in files:
        yield pq.read_table(f, columns=[column])[column]
