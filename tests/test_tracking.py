"""Trackers (Weights & Biases offline), in-trainer profiling and the goodput timeline."""
import glob
import json
import os
import struct

from bigmodel import goodput
from commands import assert_user_error, run_train

_ARGS = [
    "--config=configs/gpt.py:tiny", "--config.data.source=synthetic",
    "--config.train.log_every=2", "--config.train.eval_every=0",
    "--config.train.sample_tokens=0", "--config.train.batch_size=4",
    "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.num_heads=4",
    "--config.model.mlp_dim=128", "--config.model.max_len=32", "--config.model.vocab_size=512",
    "--config.data.seq_len=32", "--config.checkpoint.save_every=3",
    "--config.train.progress=False", "--config.train.trackers=tensorboard,wandb",
]


def _wandb_records(path):
  """The protobuf records of a ``.wandb`` file: W&B's append-only log (a
  7-byte file header, then LevelDB-style chunks: CRC 4, length 2, type 1,
  in 32 KiB blocks; types 2-4 are a record's first, middle and last parts)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:8]
  records, parts, offset, block = [], b"", 7, 32768
  while offset + 7 <= len(data):
    left = block - offset % block
    if left < 7:  # Block trailer padding.
      offset += left
      continue
    length, kind = struct.unpack("<HB", data[offset + 4:offset + 7])
    chunk = data[offset + 7:offset + 7 + length]
    offset += 7 + length
    if kind == 0:  # Zero padding.
      continue
    parts += chunk
    if kind in (1, 4):  # A whole record, or a record's last part.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      records.append(record)
      parts = b""
  return records


def _wandb_run(workdir):
  """(run id, {step: loss}) from every offline W&B run file in ``workdir``."""
  run_ids, losses = set(), {}
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb"))):
    for record in _wandb_records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run_ids.add(record.run.run_id)
      elif kind == "history":
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                 for item in record.history.item}
        if "loss" in items:
          losses[items["_step"]] = items["loss"]
  return run_ids, losses


def test_wandb_offline_profile_and_goodput_of_a_resumed_run(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  workdir = str(tmp_path / "run")
  first = run_train(*_ARGS, f"--workdir={workdir}", "--config.train.steps=4",
                    "--config.train.profile_steps=2,3")
  assert first.returncode == 0, first.stderr[-3000:]
  # W&B's banner stays off the console.
  assert "wandb:" not in first.stdout + first.stderr, first.stderr[-2000:]
  assert "profiled steps 2-3:" in first.stdout
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces, os.listdir(workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  split = [r for r in records if "profile_steps" in r][0]
  shares = [split[f"profile_{k}_share"] for k in ("compute", "data_wait", "host", "eval_and_save")]
  # Step 3 saves a checkpoint: its time is set apart from the steps' own.
  assert abs(sum(shares) - 1) < 1e-6 and split["profile_eval_and_save_share"] > 0, split
  # Each part is measured (a tiny model's compute and its hooks' host time
  # are both milliseconds: which is larger varies run to run).
  assert split["profile_compute_share"] > 0 and split["profile_host_share"] > 0, split

  second = run_train(*_ARGS, f"--workdir={workdir}", "--config.train.steps=6")
  assert second.returncode == 0, second.stderr[-3000:]
  run_ids, losses = _wandb_run(workdir)
  assert len(run_ids) == 1  # The resumed run continued the same W&B run.
  assert run_ids == {open(os.path.join(workdir, "wandb_run_id")).read().strip()}
  logged = {r["step"]: r["loss"] for r in records if "loss" in r}
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged.update({r["step"]: r["loss"] for r in records if "loss" in r})
  assert sorted(losses) == [2, 4, 6] and all(
      abs(losses[s] - logged[s]) < 1e-6 for s in losses), (losses, logged)

  # Two finished sessions, nothing redone (the second resumed from step 4).
  report = goodput.report(workdir)
  assert report["sessions"] == 2 and report["ends"] == ["finished", "finished"]
  assert report["lost_steps"] == 0 and report["seconds"]["lost"] == 0
  assert abs(sum(report["seconds"].values()) - report["wall_seconds"]) < 1e-6
  assert report["seconds"]["step"] > 0 and report["seconds"]["compile"] > 0
  assert 0 < report["goodput"] < 1


def test_bad_tracker_or_profile_steps_are_one_error(tmp_path):
  for flag, fragment in (("--config.train.trackers=tensorboard,mlflow", "unknown mlflow"),
                         ("--config.train.profile_steps=5,2", "train.profile_steps='5,2'")):
    result = run_train(*_ARGS, f"--workdir={tmp_path / 'never'}", flag)
    assert_user_error(result, fragment)
    assert not (tmp_path / "never").exists()
