"""Where gcp-storage-emulator (the suite's GCS server) differs from GCS in what
bigmodel's clients rely on, made to answer as GCS does.

Each difference cost the suite either a failure or time:

* **Create-only writes.** GCS refuses a write with ``ifGenerationMatch=0``
  when the object exists (412); gcsfs's ``mode="create"`` sends it and the
  run lock relies on it. The emulator ignores the precondition.
* **Generation headers.** GCS answers every media download with the object's
  ``x-goog-generation`` and ``x-goog-metageneration``; the emulator sends
  neither. tensorstore reads a ranged read's generation from that header,
  takes a missing one as generation 0, then refuses its own next conditional
  read of the object ("Malformed StorageGeneration"): the OCDBT manifest of a
  ``gs://`` checkpoint failed that way in most runs.
* **moveTo.** gcsfs moves an object with GCS's ``moveTo`` call and falls back
  to copy and delete only after its retries give up, against the emulator,
  which lacks the call: 34 s to move 3 small objects, 36 s to set one small
  checkpoint aside.
"""
from http import HTTPStatus


def behave_like_gcs() -> None:
  """Patches the emulator's handlers (in this process; once)."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  if getattr(server, "behaves_like_gcs", False):
    return
  _honour_create_only_writes(server)
  _send_generation_headers(server)
  _move_objects(server)
  server.behaves_like_gcs = True


def _replace_handler(server, module, name: str, handler) -> None:
  """Routes every request that ``module.name`` served to ``handler``."""
  original = getattr(module, name)
  setattr(module, name, handler)  # Handlers that call it by name (e.g. objects.get).
  for _, handlers in server.HANDLERS:
    for method, routed in handlers.items():
      if routed is original:
        handlers[method] = handler


def _honour_create_only_writes(server) -> None:
  """412 for an upload with ``ifGenerationMatch=0`` whose object exists, for
  run locks only: tensorstore's OCDBT writer sends the precondition too, and
  its recovery from a 412 needs object generations that the emulator does
  not keep."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  insert = objects.insert

  def insert_unless_exists(request, response, storage, *args, **kwargs):
    name = None
    if request.query.get("ifGenerationMatch") == ["0"]:
      name = (request.query.get("name") or [None])[0]
      if name is None and isinstance(request.data, dict):
        name = request.data.get("meta", {}).get("name")
    if name and name.endswith("/run.lock"):
      try:
        storage.get_file_obj(request.params["bucket_name"], name)
      except NotFound:
        pass
      else:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return insert(request, response, storage, *args, **kwargs)

  _replace_handler(server, objects, "insert", insert_unless_exists)


def _send_generation_headers(server) -> None:
  """The object's generation headers on every download."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      obj = {}
    if obj.get("generation"):
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return download(request, response, storage, *args, **kwargs)

  _replace_handler(server, objects, "download", download_with_generation)


def _move_objects(server) -> None:
  """``POST .../b/BUCKET/o/SOURCE/moveTo/o/DESTINATION``: the object renamed
  within its bucket (here a copy, then the source deleted)."""
  from gcp_storage_emulator import settings  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  def move(request, response, storage, *args, **kwargs):
    del args, kwargs
    bucket, source = request.params["bucket_name"], request.params["object_id"]
    try:
      moved = objects._copy(request.base_url, storage, bucket, source,  # pylint: disable=protected-access
                            bucket, request.params["dest_object_id"])
      storage.delete_file(bucket, source)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    response.json(moved)

  route = (rf"^(?:{settings.API_ENDPOINT})?/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.+)"
           r"/moveTo/o/(?P<dest_object_id>.+)$")
  server.HANDLERS = ((route, {"POST": move}),) + tuple(server.HANDLERS)
