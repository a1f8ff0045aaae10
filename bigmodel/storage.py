"""Paths that may be URLs: ``gs://``, ``s3://`` and any fsspec URL.

The one place that turns a URL into an fsspec filesystem (``gcsfs`` for
``gs://``, ``s3fs`` for ``s3://``: ``pip install "bigmodel[cloud]"``), with the
store's usual credentials and endpoints (``STORAGE_EMULATOR_HOST``,
``AWS_ENDPOINT_URL``, ...), and that turns a failed request into one
``UserError`` naming the URL. Corpora (:mod:`bigmodel.data.remote`) and run
directories (:mod:`bigmodel.remote_workdir`) both go through it.

A URL is the only way anything here reaches the network: local paths never
do. S3 requests give up after a few seconds instead of retrying for minutes.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, BinaryIO

from bigmodel.errors import UserError

# S3 (botocore) defaults retry a refused connection for minutes: an
# unreachable endpoint should be an error within seconds.
_S3_OPTIONS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                 "retries": {"max_attempts": 2}}}
_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs"}
# Local copies of what lives in object stores (run mirrors, token caches).
CACHE_ENV = "BIGMODEL_CACHE"


def is_url(path: str) -> bool:
  """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
  return "://" in path


def filesystem(url: str) -> tuple[Any, str]:
  """(fsspec filesystem, path within it) of ``url``.

  Raises:
    UserError: an unknown scheme, or its backend package is not installed.
  """
  import fsspec  # pylint: disable=g-import-not-at-top
  scheme = url.split("://", 1)[0]
  options = _S3_OPTIONS if scheme in ("s3", "s3a") else {}
  try:
    return fsspec.core.url_to_fs(url, **options)
  except ImportError as e:
    package = _BACKENDS.get(scheme, "the fsspec backend of this scheme")
    raise UserError(f"{url}: reading {scheme}:// needs {package}"
                    f" (pip install {package})") from e
  except ValueError as e:
    raise UserError(f"{url}: {e}") from e


def share_gcs_endpoint() -> None:
  """Points tensorstore's GCS driver (orbax's arrays in ``gs://``) at the
  endpoint that gcsfs uses (orbax's metadata, bigmodel's files): with
  ``STORAGE_EMULATOR_HOST`` set (an emulator, a private endpoint) both would
  otherwise go to different places. An explicit ``TENSORSTORE_GCS_HTTP_URL`` wins."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")


def store_error(url: str, error: Exception) -> UserError:
  """The one-line error of a failed request to the store."""
  if isinstance(error, FileNotFoundError):
    return UserError(f"{url}: no such bucket, folder or object")
  if isinstance(error, PermissionError):
    return UserError(f"{url}: access denied (check the credentials for this bucket)")
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  return UserError(f"{url}: cannot reach the object store ({type(error).__name__}: {message})")


def request(url: str, fn, *args, **kwargs):
  """``fn(*args, **kwargs)``: a request to the store, whose failure becomes one
  UserError naming ``url``."""
  try:
    return fn(*args, **kwargs)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise store_error(url, e) from e


def local_copy_dir(kind: str, url: str) -> str:
  """The local folder that holds a copy of ``url``'s ``kind`` of content
  (``$BIGMODEL_CACHE/KIND/<hash of the URL>``, default ``~/.cache/bigmodel``)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "bigmodel")
  return os.path.join(root, kind, hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])


def object_version(info: dict[str, Any]) -> int:
  """An int that changes when the object does (ETag, MD5, generation or time)."""
  for key in ("ETag", "etag", "md5Hash", "generation", "LastModified", "updated", "mtime"):
    if info.get(key):
      return int(hashlib.sha256(str(info[key]).encode()).hexdigest()[:15], 16)
  return 0


def open_binary(path: str) -> BinaryIO:
  """Opens a local path or a URL for reading bytes."""
  if not is_url(path):
    return open(path, "rb")
  fs, inner = filesystem(path)
  return request(path, fs.open, inner, "rb")


def read_bytes(path: str) -> bytes:
  """A local file's or an object's bytes."""
  with open_binary(path) as f:
    return f.read()


def write_bytes(url: str, data: bytes) -> None:
  """Writes an object in one upload."""
  fs, inner = filesystem(url)
  request(url, fs.pipe_file, inner, data)
