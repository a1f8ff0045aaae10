"""Corpus files in object stores: ``gs://``, ``s3://`` and any fsspec URL.

``data.paths`` (and a mixture source's ``paths``) may be a URL: a folder (its
files matching ``data.file_pattern``, recursively), one object, or a glob.
The files are listed and read through fsspec (``gcsfs`` for ``gs://``,
``s3fs`` for ``s3://``: ``pip install "bigmodel[cloud]"``), with their usual
credentials and endpoints (``STORAGE_EMULATOR_HOST``, ``AWS_ENDPOINT_URL``,
...); the records are prepared once into local ArrayRecord under
``data.data_dir`` as for local files, so training never waits on the store.
An object's version (its ETag, MD5 or generation) stands in for a local
file's modification time in the corpus fingerprint.

A URL is the only way anything here reaches the network: local paths never
do. Errors (no such bucket, access denied, the store unreachable, the
backend package missing) are one ``UserError`` naming the URL; S3 requests
give up after a few seconds instead of retrying for minutes.
"""
from __future__ import annotations

import fnmatch
import hashlib
import posixpath
from typing import Any, BinaryIO

from bigmodel.errors import UserError

# S3 (botocore) defaults retry a refused connection for minutes: an
# unreachable endpoint should be an error within seconds.
_S3_OPTIONS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                 "retries": {"max_attempts": 2}}}
_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs"}


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


def store_error(url: str, error: Exception) -> UserError:
  """The one-line error of a failed request to the store."""
  if isinstance(error, FileNotFoundError):
    return UserError(f"{url}: no such bucket, folder or object")
  if isinstance(error, PermissionError):
    return UserError(f"{url}: access denied (check the credentials for this bucket)")
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  return UserError(f"{url}: cannot reach the object store ({type(error).__name__}: {message})")


def _version(info: dict[str, Any]) -> int:
  """An int that changes when the object does (for the corpus fingerprint)."""
  for key in ("ETag", "etag", "md5Hash", "generation", "LastModified", "updated", "mtime"):
    if info.get(key):
      return int(hashlib.sha256(str(info[key]).encode()).hexdigest()[:15], 16)
  return 0


def list_files(url: str, file_pattern: str) -> tuple[str, list[tuple[str, int, int]]]:
  """The files a URL names: (root URL, [(URL, size, version), ...]).

  A folder gives its files matching ``file_pattern`` (recursively), an
  object itself, anything else is a glob.

  Raises:
    UserError: nothing matches, or the store cannot be read.
  """
  fs, path = filesystem(url)
  protocol = url.split("://", 1)[0]
  try:
    if fs.isdir(path):
      root = path.rstrip("/")
      infos = [info for info in fs.find(path, detail=True).values()
               if info.get("type") == "file"
               and fnmatch.fnmatch(posixpath.basename(info["name"]), file_pattern)]
    elif fs.isfile(path):
      root, infos = posixpath.dirname(path), [fs.info(path)]
    else:
      infos = [info for info in fs.glob(path, detail=True).values()
               if info.get("type") == "file"]
      root = posixpath.commonpath([posixpath.dirname(i["name"]) for i in infos]) if infos else ""
  except Exception as e:  # pylint: disable=broad-except
    raise store_error(url, e) from e
  if not infos:
    raise UserError(f"data.paths={url!r} matches no object (as a folder with"
                    f" data.file_pattern={file_pattern!r}, an object or a glob)")
  files = [(f"{protocol}://{info['name']}", int(info.get("size") or 0), _version(info))
           for info in infos]
  return f"{protocol}://{root}", sorted(files)


def open_binary(path: str) -> BinaryIO:
  """Opens a local path or a URL for reading bytes."""
  if not is_url(path):
    return open(path, "rb")
  fs, inner = filesystem(path)
  try:
    return fs.open(inner, "rb")
  except Exception as e:  # pylint: disable=broad-except
    raise store_error(path, e) from e
