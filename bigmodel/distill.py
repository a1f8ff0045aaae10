"""Knowledge distillation from a frozen teacher run (``config.distill``).

``--config.distill.teacher=WORKDIR`` trains this run's model (the student)
on ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss``
(Hinton et al., 2015), the distributions taken at temperature T over what
the family predicts: next tokens (decoders), masked tokens (BERT's MLM), the
classes (classification), the target tokens given the gold prefix (T5). The
teacher is any run of the same family and vocabulary (one converted from
Hugging Face included; a LoRA run's adapters are merged): its parameters sit
in the train state's frozen ``reference`` slot, sharded on the student's mesh
by the same logical-axis rules, optionally in bfloat16 (``distill.teacher_dtype``),
and its forward pass runs in the same jitted step. Checkpoints point to the
teacher's checkpoint instead of saving it again (``bigmodel.run.base_source``).
"""
import copy
import functools
import os
from typing import Any

import jax
import ml_collections

from bigmodel import run as run_lib
from bigmodel.errors import UserError
from bigmodel.models import build_model
from bigmodel.sharding import path_name

TEACHER_DTYPES = ("", "float32", "bfloat16")


def enabled(config) -> bool:
  return bool(config.get("distill") is not None and config.distill.teacher)


def validate(config) -> None:
  """Config checks that read no teacher: one UserError line each."""
  d = config.distill
  if not 0.0 <= d.alpha <= 1.0:
    raise UserError(f"distill.alpha must be in [0, 1], got {d.alpha}")
  if d.temperature <= 0:
    raise UserError(f"distill.temperature must be positive, got {d.temperature}")
  if d.teacher_dtype not in TEACHER_DTYPES:
    raise UserError(f"distill.teacher_dtype={d.teacher_dtype!r} is not one of: float32, "
                    "bfloat16 (or empty: as saved)")
  if enabled(config) and config.data.task == "preference":
    raise UserError("distill.teacher and data.task=preference (DPO) both need the "
                    "reference slot; distil and run DPO as two runs")


@functools.lru_cache(maxsize=8)
def _saved_teacher_config(teacher: str) -> tuple[dict, int]:
  """(the teacher's config as saved with its newest checkpoint, its step)."""
  saved, step = run_lib.saved_config(teacher)
  return saved.to_dict(), step


def teacher_config(config) -> ml_collections.ConfigDict:
  """The teacher's config (adapters merged: ``lora.rank`` 0), checked against
  the student's: same family, vocabulary (and classes), and tokenizer.

  Raises:
    UserError: a missing teacher, another family, vocabulary or tokenizer.
  """
  saved, _ = _saved_teacher_config(os.path.abspath(config.distill.teacher))
  teacher = ml_collections.ConfigDict(copy.deepcopy(saved))
  where = f"distill.teacher={config.distill.teacher}"
  t, s = teacher.model, config.model
  if t.family != s.family:
    raise UserError(f"{where} is a {t.family} model; the student is {s.family}: distillation "
                    "needs one family")
  for key in ("vocab_size", "num_classes"):
    if t.get(key, 0) != s.get(key, 0):
      raise UserError(f"{where} has model.{key}={t.get(key, 0)}, the student "
                      f"{s.get(key, 0)}: the teacher's and student's outputs must match")
  if t.get("weight_bits", 0):
    raise UserError(f"{where} holds {t.weight_bits}-bit quantized weights (bigmodel.quantize); "
                    "distil from the float run it was made from")
  _check_same_tokenizer(config, teacher, where)
  teacher.lora.rank = 0  # Restoring merges a LoRA teacher's adapters.
  if config.distill.teacher_dtype:
    teacher.model.dtype = teacher.model.param_dtype = config.distill.teacher_dtype
  return teacher


def _check_same_tokenizer(config, teacher, where: str) -> None:
  """The same ids for the same text: the two tokenizer files are equal."""
  def tokenizer_file(cfg, workdir: str) -> str:
    path = cfg.data.get("tokenizer", "")
    if path and os.path.isdir(path):
      return os.path.join(path, "tokenizer.json")
    return path or run_lib.RunDir(workdir).tokenizer_model

  if config.data.get("source") == "synthetic":
    return
  teacher_file = tokenizer_file(teacher, config.distill.teacher)
  student_file = config.data.get("tokenizer", "")
  if not student_file:
    raise UserError(f"{where}: give the student the teacher's tokenizer "
                    f"(--config.data.tokenizer={teacher_file}); a tokenizer trained anew "
                    "would number the tokens differently")
  student_file = (os.path.join(student_file, "tokenizer.json") if os.path.isdir(student_file)
                  else student_file)
  if not (os.path.isfile(teacher_file) and os.path.isfile(student_file)):
    return  # Either side reports its own missing tokenizer when the run reads it.
  with open(teacher_file, "rb") as a, open(student_file, "rb") as b:
    if a.read() != b.read():
      raise UserError(f"{where} was trained with the tokenizer {teacher_file}, not "
                      f"{student_file}: the token ids would not match")


def without_teacher(config) -> ml_collections.ConfigDict:
  """A copy of ``config`` that distils from nothing: what reading a student's
  parameters needs (the teacher may be gone by then)."""
  copied = ml_collections.ConfigDict(config.to_dict())
  copied.distill.teacher = ""
  return copied


def teacher_model(config):
  """The teacher's Flax module (no dropout), or None without ``distill.teacher``."""
  return build_model(teacher_config(config).model) if enabled(config) else None


def load_teacher(state: Any, abstract_reference: Any, config, mesh) -> tuple[Any, dict]:
  """``state`` with the teacher's parameters in ``state.reference`` (placed and
  cast like ``abstract_reference``); and the base source the run's
  checkpoints save instead of them."""
  params, _, step = run_lib.restore_params(config.distill.teacher, mesh)
  flat = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def place(path, target):
    source = flat[path_name(path)]
    return jax.device_put(source.astype(target.dtype), target.sharding)

  reference = jax.tree_util.tree_map_with_path(place, abstract_reference)
  print(f"distilling from {config.distill.teacher} (step {step}, "
        f"{sum(x.size for x in jax.tree_util.tree_leaves(reference)) / 1e6:.2f}M parameters)",
        flush=True)
  source = run_lib.base_source(config.distill.teacher, step, "teacher", [], sorted(flat))
  return state.replace(reference=reference), source
