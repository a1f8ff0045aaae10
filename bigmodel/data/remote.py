"""Corpus files in object stores: ``gs://``, ``s3://`` and any fsspec URL.

``data.paths`` (and a mixture source's ``paths``) may be a URL: a folder (its
files matching ``data.file_pattern``, recursively), one object, or a glob.
The files are listed and read through fsspec (:mod:`bigmodel.storage`); the
records are prepared once into local ArrayRecord under ``data.data_dir`` as
for local files, so training never waits on the store.
An object's version (its ETag, MD5 or generation) stands in for a local
file's modification time in the corpus fingerprint.

Errors (no such bucket, access denied, the store unreachable, the backend
package missing) are one ``UserError`` naming the URL.
"""
from __future__ import annotations

import fnmatch
import posixpath

from bigmodel.errors import UserError
from bigmodel.storage import filesystem, object_version, store_error


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
  files = [(f"{protocol}://{info['name']}", int(info.get("size") or 0), object_version(info))
           for info in infos]
  return f"{protocol}://{root}", sorted(files)
