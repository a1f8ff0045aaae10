"""Record shards: files that hold many documents each.

Pretraining corpora ship as many shards of JSON lines or Parquet; this
module reads the documents of one shard, whatever its format (by file name):

* JSON lines: ``*.jsonl``, ``*.ndjson``, compressed ``*.jsonl.gz`` /
  ``*.jsonl.zst`` (gzip / zstandard streams): one JSON object per line, the
  text in its ``text_key`` field;
* Parquet (``*.parquet``, pyarrow): the ``text_key`` column, read in row
  batches (never the whole file at once);
* ArrayRecord (``*.array_record``): one JSON object per record (as a JSON
  line), or else the record's UTF-8 text itself.

A record that is not a JSON object, lacks ``text_key`` or whose text is not a
string is *bad*: it is skipped and counted. A shard with more bad records
than ``max_bad_fraction`` of its records (and at least
:data:`MIN_BAD_RECORDS_TO_STOP`) stops the run with a ``UserError`` naming
the shard and its first bad record: a few broken lines in a crawl are
normal, a shard of them is the wrong file or the wrong ``text_key``. A shard
that cannot be decoded (a corrupt ``.gz``, a file that is not Parquet) or a
Parquet file without the column is a ``UserError`` at once.

Other files are not shards: :mod:`bigmodel.data.corpus` reads them as one
document each.
"""
from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from absl import logging

from bigmodel import storage
from bigmodel.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = (".gz", ".zst")
PARQUET_SUFFIX = ".parquet"
ARRAY_RECORD_SUFFIX = ".array_record"
# A handful of bad records never stops a run, whatever the fraction.
MIN_BAD_RECORDS_TO_STOP = 10
# Parquet rows read at a time: bounded memory for any file size.
_PARQUET_BATCH_ROWS = 1024


def shard_format(path: str) -> str | None:
  """``"jsonl"``, ``"parquet"``, ``"array_record"`` or None (not a shard)."""
  name = path.lower()
  for compression in COMPRESSIONS:
    if name.endswith(compression):
      name = name[:-len(compression)]
      return "jsonl" if name.endswith(JSONL_SUFFIXES) else None
  if name.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if name.endswith(PARQUET_SUFFIX):
    return "parquet"
  if name.endswith(ARRAY_RECORD_SUFFIX):
    return "array_record"
  return None


def _decompressed(path: str, raw: BinaryIO) -> BinaryIO:
  if path.lower().endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  if path.lower().endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
  return raw


def _text_of(value: Any, text_key: str) -> str | None:
  """The text of one decoded JSON record; None if it is bad."""
  if not isinstance(value, dict):
    return None
  text = value.get(text_key)
  return text if isinstance(text, str) else None


def jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number from 1, line) of a JSON-lines file, decompressed by its
  name (``.gz``, ``.zst``), blank lines left out; local or a URL."""
  with storage.open_binary(path) as raw, _decompressed(path, raw) as stream:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace")
    for number, line in enumerate(text, start=1):
      if line.strip():  # Blank lines (a trailing newline) are not records.
        yield number, line


def parquet_rows(path: str, columns: Mapping[str, str]) -> Iterator[dict[str, Any]]:
  """The rows of a Parquet file as dicts of ``columns``' values, read in
  batches of rows.

  Args:
    path: Local path or URL.
    columns: option (e.g. ``data.text_key``) -> the column it names.

  Raises:
    UserError: a column that the file lacks, naming its option.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  parquet = pq.ParquetFile(storage.open_binary(path) if storage.is_url(path) else path)
  names = parquet.schema_arrow.names
  for option, column in columns.items():
    if column not in names:
      raise UserError(f"{path}: Parquet file has no column {option}={column!r}"
                      f" (columns: {', '.join(names)})")
  for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS,
                                    columns=sorted(set(columns.values()))):
    yield from batch.to_pylist()


def _jsonl_records(path: str, text_key: str) -> Iterator[str | None]:
  for _, line in jsonl_lines(path):
    try:
      yield _text_of(json.loads(line), text_key)
    except json.JSONDecodeError:
      yield None


def _parquet_records(path: str, text_key: str) -> Iterator[str | None]:
  for row in parquet_rows(path, {"data.text_key": text_key}):
    value = row[text_key]
    if isinstance(value, bytes):
      value = value.decode("utf-8", errors="replace")
    yield value if isinstance(value, str) else None


def _array_record_records(path: str, text_key: str) -> Iterator[str | None]:
  if storage.is_url(path):
    raise UserError(f"{path}: ArrayRecord shards are read from local paths only (the"
                    " library has no object-store reader); copy them, or use JSONL or Parquet")
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for start in range(0, reader.num_records(), _PARQUET_BATCH_ROWS):
      stop = min(start + _PARQUET_BATCH_ROWS, reader.num_records())
      for record in reader.read(range(start, stop)):
        text = record.decode("utf-8", errors="replace")
        if text.lstrip().startswith("{"):
          try:
            yield _text_of(json.loads(text), text_key)
            continue
          except json.JSONDecodeError:
            pass  # Text that starts with a brace: a plain-text record.
        yield text
  finally:
    reader.close()


_READERS = {"jsonl": _jsonl_records, "parquet": _parquet_records,
            "array_record": _array_record_records}


def read_texts(path: str, text_key: str, max_bad_fraction: float
               ) -> Iterator[tuple[int, str]]:
  """(record index, text) of every good record of a shard, in file order.

  Indexes count bad records too, so that they name the same record whatever
  is skipped.

  Raises:
    UserError: a shard that cannot be decoded, a Parquet file without
      ``text_key``, or more bad records than ``max_bad_fraction`` of them
      (and at least :data:`MIN_BAD_RECORDS_TO_STOP`); raised once the shard is
      read, so a caller that writes as it reads must discard what it wrote.
  """
  fmt = shard_format(path)
  if fmt is None:
    raise ValueError(f"{path} is not a record shard")
  bad, first_bad, index = 0, None, -1
  try:
    for index, text in enumerate(_READERS[fmt](path, text_key)):
      if text is None:
        bad += 1
        first_bad = index if first_bad is None else first_bad
      else:
        yield index, text
  except UserError:
    raise
  except (ConnectionError, PermissionError, FileNotFoundError) as e:
    raise storage.store_error(path, e) from e
  except Exception as e:  # pylint: disable=broad-except
    # gzip.BadGzipFile, EOFError, zstandard.ZstdError, pyarrow.ArrowInvalid,
    # array_record's RuntimeError: all mean "this file is not what its name says".
    raise UserError(f"{path}: cannot read it as {fmt} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'truncated or corrupt'})") from e
  total = index + 1
  if bad >= MIN_BAD_RECORDS_TO_STOP and bad > max_bad_fraction * total:
    raise UserError(
        f"{path}: {bad} of {total} records are not JSON objects with a string"
        f" {text_key!r} field (the first is record {first_bad}), more than"
        f" data.max_bad_fraction={max_bad_fraction}; check data.text_key")
  if bad:
    logging.warning("%s: skipped %d bad records of %d (the first is record %d)",
                    path, bad, total, first_bad)
