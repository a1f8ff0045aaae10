"""``bigmodel.convert`` on hostile or broken input: paths, file modes, bad files, untied heads.

Bad input must end in one ``error:`` line (a ``UserError``, exit status 2)
before anything is written to the workdir. Most cases call ``import_hf`` /
``export_hf`` directly (the command line only wraps them in
``user_errors_exit``); ``test_the_command_line_says_one_error_line`` checks
that wrapping on a few of them.
"""
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bigmodel.errors import UserError
from bigmodel.hf import interop
from bigmodel.hf.interop import export_hf, import_hf
from test_convert import _FIXTURES, _broken_copy, convert, logits

_SHARD = "model-00001-of-00003.safetensors"
_INDEX = "model.safetensors.index.json"


def _copy(tmp_path, **kwargs):
  """test_convert's GPT-2 copy, as a path."""
  return pathlib.Path(_broken_copy(tmp_path, **kwargs))


def _sharded_copy(tmp_path):
  target = tmp_path / "sharded"
  shutil.copytree(f"{_FIXTURES}/gpt2_sharded", target)
  return target


def _edit_index(model, edit):
  index = json.load(open(model / _INDEX))
  edit(index["weight_map"])
  json.dump(index, open(model / _INDEX, "w"))


def _refused(model, message, tmp_path, family="gpt2"):
  """import_hf of ``model`` raises a UserError matching ``message`` and writes nothing."""
  workdir = tmp_path / "workdir"
  with pytest.raises(UserError, match=message):
    import_hf(str(model), family, str(workdir))
  assert not os.path.exists(workdir)


# Item 4: every file read must resolve inside the model directory.

def _shard_up_and_out(tmp_path):
  """A shard listed as ../other/model.safetensors (a valid model elsewhere)."""
  model = _sharded_copy(tmp_path)
  shutil.copytree(f"{_FIXTURES}/gpt2", tmp_path / "other")
  _edit_index(model, lambda m: m.update({k: "../other/model.safetensors" for k in m}))
  return model, r"\.\./other/model\.safetensors"


def _shard_absolute(tmp_path):
  model = _sharded_copy(tmp_path)
  _edit_index(model, lambda m: m.update({k: f"{_FIXTURES}/gpt2/model.safetensors" for k in m
                                         if m[k] == _SHARD}))
  return model, "gpt2/model.safetensors"


def _symlinked(name, target):
  def make(tmp_path):
    model = _copy(tmp_path)
    outside = tmp_path / "outside"
    shutil.copyfile(target, outside)
    if os.path.exists(model / name):
      os.remove(model / name)
    os.symlink(outside, model / name)
    return model, name.replace(".", r"\.")
  return make


def _symlinked_index(tmp_path):
  model = _sharded_copy(tmp_path)
  shutil.move(model / _INDEX, tmp_path / "index.json")
  os.symlink(tmp_path / "index.json", model / _INDEX)
  return model, r"model\.safetensors\.index\.json"


@pytest.mark.parametrize("make", [
    _shard_up_and_out, _shard_absolute, _symlinked_index,
    _symlinked("config.json", f"{_FIXTURES}/gpt2/config.json"),
    _symlinked("model.safetensors", f"{_FIXTURES}/gpt2/model.safetensors"),
    _symlinked("tokenizer.json", f"{_FIXTURES}/gpt2/tokenizer.json"),
    # The case: a "vocab.txt" that is /etc/passwd (here: a file beside the model).
    _symlinked("vocab.txt", f"{_FIXTURES}/gpt2/config.json"),
], ids=["shard_dotdot", "shard_absolute", "index_symlink", "config_symlink", "weights_symlink",
        "tokenizer_symlink", "vocab_symlink"])
def test_files_outside_the_model_directory_are_refused(make, tmp_path):
  model, name = make(tmp_path)
  _refused(model, f"{name}.* outside the model directory", tmp_path)


def test_a_hugging_face_cache_snapshot_imports(tmp_path):
  """The hub cache links snapshots/REV/FILE to ../../blobs/HASH: that stays allowed."""
  repo = tmp_path / "models--tiny--gpt2"
  os.makedirs(repo / "blobs")
  os.makedirs(repo / "snapshots" / "abc123")
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(f"{_FIXTURES}/gpt2/{name}", repo / "blobs" / f"hash-{name}")
    os.symlink(f"../../blobs/hash-{name}", repo / "snapshots" / "abc123" / name)
  summary = import_hf(str(repo / "snapshots" / "abc123"), None, str(tmp_path / "workdir"))
  assert summary["tokenizer"] == ["tokenizer.json", "tokenizer_config.json"]


# Item 6: exported files follow the umask like every other output.

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_files_get_the_umask_mode(umask, tmp_path):
  workdir, out = str(tmp_path / "workdir"), tmp_path / "hf"
  import_hf(f"{_FIXTURES}/gpt2", "gpt2", workdir)
  old = os.umask(umask)
  try:
    export_hf(workdir, str(out))
  finally:
    os.umask(old)
  modes = {name: oct(os.stat(out / name).st_mode & 0o777) for name in os.listdir(out)}
  assert modes == {name: oct(0o666 & ~umask) for name in modes}
  assert "model.safetensors" in modes


# Item 14: broken files and nonsense sizes.

def _rewrite(name, content, source="gpt2"):
  def make(tmp_path):
    model = _copy(tmp_path) if source == "gpt2" else _sharded_copy(tmp_path)
    data = open(model / name, "rb").read()
    open(model / name, "wb").write(content(data))
    return model
  return make


def _config(family, **update):
  def make(tmp_path):
    model = tmp_path / family
    shutil.copytree(f"{_FIXTURES}/{family}", model)
    config = json.load(open(model / "config.json"))
    json.dump(dict(config, **update), open(model / "config.json", "w"))
    return model
  return make


def _wrong_shard(tmp_path):
  """The index names a shard that does not hold the tensor."""
  model = _sharded_copy(tmp_path)
  _edit_index(model, lambda m: m.update({"transformer.ln_f.weight": _SHARD}))
  return model


_NOT_SAFETENSORS = "is not a valid safetensors file"


@pytest.mark.parametrize("make,family,message", [
    (_rewrite("model.safetensors", lambda d: b""), "gpt2",
     rf"model\.safetensors {_NOT_SAFETENSORS}.*header too small"),
    (_rewrite("model.safetensors", lambda d: b"garbage!" * 20), "gpt2",
     rf"model\.safetensors {_NOT_SAFETENSORS}"),
    (_rewrite("model.safetensors", lambda d: d[:-100]), "gpt2",
     rf"model\.safetensors {_NOT_SAFETENSORS}.*not fully covered"),
    (_rewrite("model-00002-of-00003.safetensors", lambda d: d[:len(d) // 2], "sharded"), "gpt2",
     rf"model-00002-of-00003\.safetensors {_NOT_SAFETENSORS}"),
    (_wrong_shard, "gpt2", rf"{_SHARD} has no tensor transformer\.ln_f\.weight, but {_INDEX}"),
    (_rewrite(_INDEX, lambda d: d[:50], "sharded"), "gpt2", rf"{_INDEX} is not valid JSON"),
    (_rewrite(_INDEX, lambda d: b"[1, 2]", "sharded"), "gpt2", rf"{_INDEX} is not a JSON object"),
    (_rewrite(_INDEX, lambda d: b'{"weight_map": {"x": 3}}', "sharded"), "gpt2",
     rf"{_INDEX} maps x to 3, not a file name"),
    (_rewrite("config.json", lambda d: b"[1, 2]"), "gpt2", r"config\.json is not a JSON object"),
    (_rewrite("tokenizer.json", lambda d: b"{}"), "gpt2",
     r"tokenizer\.json is not a readable tokenizer file"),
    (_config("gpt2", n_head=5), "gpt2", r"config\.json n_head=5 does not divide n_embd=32"),
    (_config("gpt2", n_layer=0), "gpt2", r"config\.json n_layer=0 is not a positive integer"),
    (_config("gpt2", n_layer=-2), "gpt2", r"config\.json n_layer=-2 is not a positive integer"),
    (_config("gpt2", n_embd="32"), "gpt2", r"config\.json n_embd='32' is not a positive integer"),
    (_config("bert", num_attention_heads=3), "bert",
     r"config\.json num_attention_heads=3 does not divide hidden_size=32"),
    (_config("t5", num_decoder_layers=-1), "t5",
     r"config\.json num_decoder_layers=-1 is not a positive integer"),
], ids=["weights_empty", "weights_garbage", "weights_truncated", "shard_truncated",
        "shard_lacks_tensor", "index_not_json", "index_list", "index_bad_value", "config_list",
        "tokenizer_garbage",
        "heads_do_not_divide", "zero_layers", "negative_layers", "string_width", "bert_heads",
        "t5_negative_decoder_layers"])
def test_broken_files_and_nonsense_sizes_are_refused(make, family, message, tmp_path):
  _refused(make(tmp_path), message, tmp_path, family)


@pytest.mark.parametrize("make,message", [
    (_symlinked("vocab.txt", f"{_FIXTURES}/gpt2/config.json"),
     "vocab.txt resolves to .*outside the model directory"),
    (_rewrite("model.safetensors", lambda d: b"garbage!" * 20), f"{_NOT_SAFETENSORS}"),
    (_config("gpt2", n_head=5), "config.json n_head=5 does not divide n_embd=32"),
], ids=["vocab_symlink", "weights_garbage", "heads_do_not_divide"])
def test_the_command_line_says_one_error_line(make, message, tmp_path):
  model = make(tmp_path)
  if isinstance(model, tuple):
    model = model[0]
  workdir = tmp_path / "workdir"
  result = convert(f"--from_hf={model}", f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), last
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir)


# General rule: a failure after writing began leaves nothing it wrote, and never
# touches what was there.

def test_a_failed_import_removes_only_what_it_wrote(tmp_path, monkeypatch):
  def disk_full(*args):
    raise OSError("No space left on device")
  monkeypatch.setattr(interop, "_save_params", disk_full)
  fresh = tmp_path / "fresh"
  with pytest.raises(OSError, match="No space"):
    import_hf(f"{_FIXTURES}/gpt2", "gpt2", str(fresh))
  assert not os.path.exists(fresh)
  existing = tmp_path / "existing"
  os.makedirs(existing / "checkpoints")
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(OSError, match="No space"):
    import_hf(f"{_FIXTURES}/gpt2", "gpt2", str(existing))
  assert sorted(os.listdir(existing)) == ["checkpoints", "notes.txt"]
  assert os.listdir(existing / "checkpoints") == []
  assert (existing / "notes.txt").read_text() == "mine"


def test_an_existing_config_or_tokenizer_is_never_overwritten(tmp_path):
  for name in ("config.json", "tokenizer/tokenizer.json"):
    workdir = tmp_path / name.split("/")[0]
    os.makedirs(os.path.dirname(workdir / name), exist_ok=True)
    (workdir / name).write_text("mine")
    with pytest.raises(UserError, match=f"already holds {name.split('/')[0]}"):
      import_hf(f"{_FIXTURES}/gpt2", "gpt2", str(workdir))
    assert (workdir / name).read_text() == "mine"


# Item 15: GPT-2's untied head, and T5's feed_forward_proj wording.

def test_an_untied_gpt2_head_imports_and_round_trips(tmp_path):
  model = _copy(tmp_path, config_update={"tie_word_embeddings": False})
  tensors = load_file(model / "model.safetensors")
  # A head unlike the embedding: reversed rows, doubled. Logits follow exactly.
  head = 2 * tensors["transformer.wte.weight"][::-1]
  save_file(dict(tensors, **{"lm_head.weight": head}), model / "model.safetensors",
            metadata={"format": "pt"})
  reference = np.load(f"{_FIXTURES}/gpt2/reference.npz")
  first, out, again = (str(tmp_path / n) for n in ("first", "hf", "again"))
  import_hf(str(model), "gpt2", first)
  got = np.asarray(logits(first, reference))
  np.testing.assert_allclose(got, 2 * reference["logits"][..., ::-1], atol=1e-4)
  export_hf(first, out)
  assert json.load(open(f"{out}/config.json"))["tie_word_embeddings"] is False
  np.testing.assert_array_equal(load_file(f"{out}/model.safetensors")["lm_head.weight"], head)
  import_hf(out, "gpt2", again)
  np.testing.assert_array_equal(np.asarray(logits(again, reference)), got)
  # A tied config still requires the stored head to equal the embedding.
  config = json.load(open(model / "config.json"))
  json.dump(dict(config, tie_word_embeddings=True), open(model / "config.json", "w"))
  _refused(model, "lm_head.weight differs from transformer.wte.weight", tmp_path)


@pytest.mark.parametrize("proj", ["gated-silu", "silu", "gated-gelu-new", 3])
def test_t5_feed_forward_proj_names_the_supported_ones(proj, tmp_path):
  model = _config("t5", feed_forward_proj=proj)(tmp_path)
  _refused(model, rf"^config\.json feed_forward_proj={proj!r} is not supported; supported: "
           r"gated-gelu, gated-gelu_new, gated-gelu_pytorch_tanh, gated-relu, relu$", tmp_path,
           "t5")
