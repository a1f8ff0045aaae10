"""What a train step minimises: cross-entropy, DPO on preference pairs, or
distillation from a teacher.

An objective maps (model, params, batch) to the weighted sum of its
per-unit losses, the per-unit weights (units: tokens, examples or
preference pairs) and per-unit extras averaged the same way (``correct``
becomes the accuracy). ``train_step`` and ``eval_step`` normalise by the
batch's total weight, so micro-batches and evaluation batches of any fill
combine exactly. A sum rather than per-unit losses lets cross-entropy with
``model.loss_chunk_len`` compute its gradient while it runs
(``bigmodel.models.chunked_loss``).

DPO (Rafailov et al., 2023): for a prompt x with a chosen reply y_w and a
rejected one y_l, the policy's reward of a reply is beta times its log-
probability ratio to the frozen reference model's,
r(y) = beta (log pi(y | x) - log pi_ref(y | x)), and the loss is
-log sigmoid(r(y_w) - r(y_l)), plus ``dpo.sft_weight`` times the chosen
reply's per-token negative log-likelihood (RPO, Pang et al., 2024: it keeps
the chosen replies likely while their margin grows). The reference is the starting model: with
LoRA the same parameters with the adapters switched off (their B zero),
otherwise a frozen copy of the starting parameters kept in the train state
(``TrainState.reference``). Both replies and the reference run in the same
jitted step, the two replies as one batch of 2B rows.

Distillation (Hinton et al., 2015): per unit, alpha T^2 KL(p_teacher,T ||
p_student,T) + (1 - alpha) cross-entropy, the teacher's parameters in
``TrainState.reference`` (``bigmodel.distill``). Its evaluation is the
student's own cross-entropy (``for_evaluation``), comparable with a run
trained without a teacher.
"""
import dataclasses
import re
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from bigmodel import distill
from bigmodel.models import (batch_logits, batch_outputs, build_model, chunked_loss, lora,
                             moe, output_head, quantization, targets_and_weights)

# Modules whose kernels make the vocabulary logits: an untied head, or the
# token embedding when tied.
HEAD_MODULES = ("lm_head", "token_embed")

# The weighted loss sum (a scalar), weights [U] and extras {name: [U]} of U units.
Units = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """Next-token, MLM, seq2seq or class cross-entropy (the family's targets).

  ``chunk_len`` > 0: the output projection and the loss run in chunks of
  that many positions (``bigmodel.models.chunked_loss``), never holding the
  batch's logits; the family must have an ``output_head``.
  """
  chunk_len: int = dataclasses.field(default=0, kw_only=True)
  # Extras averaged into the train metrics, by name (those the model has).
  train_metrics = {name: name for name in moe.AUX_NAMES}
  passes = 3  # Model FLOPs of a step in forward passes: forward and backward.

  def model_batch_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes of what the model reads of a batch of ``shapes`` (FLOPs, tokens)."""
    return shapes

  def weights(self, model, batch) -> jax.Array:
    return targets_and_weights(model, batch)[1]

  def __call__(self, model, params: Any, batch: dict[str, jax.Array],
               rng: Optional[jax.Array], reference: Any = None) -> Units:
    del reference
    targets, weights = targets_and_weights(model, batch)
    out, aux = batch_outputs(model, params, batch, rng=rng, head=not self.chunk_len)
    if self.chunk_len:
      loss_sum, _, predictions = chunked_loss.cross_entropy(
          out, output_head(model, params), targets, weights, self.chunk_len)
    else:
      predictions = jnp.argmax(out, axis=-1)
      loss_sum = weighted_sum(
          optax.softmax_cross_entropy_with_integer_labels(out, targets), weights)
    if aux and rng is not None:  # Training (evaluation reports cross-entropy alone).
      c = model.config
      penalty = (c.moe_load_balance_weight * aux["moe_load_balance"]
                 + c.moe_router_z_weight * aux["moe_router_z"])
      loss_sum = loss_sum + penalty * weights.sum()  # Its share of the normalised loss.
    extras = {name: jnp.full(weights.shape, value) for name, value in aux.items()}
    return loss_sum, weights, {"correct": (predictions == targets).astype(jnp.float32),
                               "predictions": predictions, **extras}


@dataclasses.dataclass(frozen=True)
class Dpo:
  """Direct preference optimisation over ``chosen_*`` / ``rejected_*`` rows.

  Extras per pair: ``correct`` (the chosen reply's reward is the higher:
  the preference accuracy) and ``reward_margin`` (r(y_w) - r(y_l)).
  """
  beta: float
  # The model the reference runs as: the training model without dropout
  # (Qwix applies LoRA dropout whenever an adapter runs). None: ``model``.
  reference_model: Any = None
  # Weight of the chosen reply's per-token negative log-likelihood added to
  # each pair's loss (RPO; Pang et al., 2024): 0 = plain DPO.
  sft_weight: float = 0.0
  train_metrics = {"correct": "preference_accuracy", "reward_margin": "reward_margin",
                   "chosen_nll": "chosen_nll"}
  passes = 4  # The policy's forward and backward, the reference's forward.

  def model_batch_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    batch, length = shapes["chosen_inputs"]
    return {"inputs": (2 * batch, length)}  # Both replies, one forward.

  def weights(self, model, batch) -> jax.Array:
    del model
    return batch["example_mask"]

  def reply_logps(self, model, params, batch, rng) -> tuple[jax.Array, jax.Array]:
    """log pi(reply | prompt) of the chosen and the rejected replies, [B] each."""
    rows = {key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
            for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    logits_2BxLxV = batch_logits(model, params, rows, rng=rng)
    logp_2BxL = -optax.softmax_cross_entropy_with_integer_labels(logits_2BxLxV, rows["targets"])
    logp_2B = (logp_2BxL * rows["loss_mask"]).sum(axis=-1)
    return jnp.split(logp_2B, 2)

  def __call__(self, model, params: Any, batch: dict[str, jax.Array],
               rng: Optional[jax.Array], reference: Any = None) -> Units:
    chosen_B, rejected_B = self.reply_logps(model, params, batch, rng)
    if reference is None:  # LoRA: the starting model is the base, adapters off.
      reference = switch_off_adapters(params)
    reference_model = model if self.reference_model is None else self.reference_model
    ref_chosen_B, ref_rejected_B = jax.lax.stop_gradient(
        self.reply_logps(reference_model, reference, batch, None))
    margin_B = self.beta * ((chosen_B - ref_chosen_B) - (rejected_B - ref_rejected_B))
    chosen_nll_B = -chosen_B / jnp.maximum(batch["chosen_loss_mask"].sum(axis=-1), 1.0)
    loss_B = -jax.nn.log_sigmoid(margin_B) + self.sft_weight * chosen_nll_B
    return (weighted_sum(loss_B, batch["example_mask"]), batch["example_mask"],
            {"correct": (margin_B > 0).astype(jnp.float32), "reward_margin": margin_B,
             "chosen_nll": chosen_nll_B})


@dataclasses.dataclass(frozen=True)
class Distill(CrossEntropy):
  """Distillation loss on the cross-entropy's units (tokens, masked tokens,
  classes), with its batch shapes and weights.

  Extras per unit: ``distill_kl`` (KL(teacher_T || student_T)) and
  ``task_loss`` (the cross-entropy with the data's targets). ``passes``
  counts the student's; the trainer adds the teacher's forward pass.
  """
  alpha: float
  temperature: float
  teacher_model: Any  # The teacher's module; its parameters come as ``reference``.
  train_metrics = {"distill_kl": "distill_kl", "task_loss": "task_loss"}

  def __call__(self, model, params: Any, batch: dict[str, jax.Array],
               rng: Optional[jax.Array], reference: Any = None) -> Units:
    logits = batch_logits(model, params, batch, rng=rng).astype(jnp.float32)
    targets, weights = targets_and_weights(model, batch)
    teacher_logits = jax.lax.stop_gradient(
        batch_logits(self.teacher_model, reference, batch, rng=None)).astype(jnp.float32)
    t = self.temperature
    teacher_logp = jax.nn.log_softmax(teacher_logits / t, axis=-1)
    student_logp = jax.nn.log_softmax(logits / t, axis=-1)
    kl = (jnp.exp(teacher_logp) * (teacher_logp - student_logp)).sum(axis=-1)
    task_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # T^2 keeps the soft targets' gradient scale independent of T (Hinton et al.).
    loss = self.alpha * t * t * kl + (1.0 - self.alpha) * task_loss
    predictions = jnp.argmax(logits, axis=-1)
    return weighted_sum(loss, weights), weights, {
        "correct": (predictions == targets).astype(jnp.float32),
        "predictions": predictions, "distill_kl": kl, "task_loss": task_loss}


def weighted_sum(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(weights x losses): a batch's share of the normalised loss."""
  return (losses * weights).sum()


def switch_off_adapters(params: Any) -> Any:
  """``params`` with every LoRA adapter's B zero: the base model's function."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict(
      {name: jnp.zeros_like(x) if name.endswith(lora.ADAPTER_SUFFIXES[1]) else x
       for name, x in flat.items()}, sep="/")


def for_config(config, eval_model=None) -> Any:
  """The objective of ``config``'s task: DPO for ``data.task=preference``
  (its reference runs as ``eval_model``, the run's model without dropout),
  distillation with ``distill.teacher``, else cross-entropy."""
  if config.data.task == "preference":
    return Dpo(config.dpo.beta, eval_model or build_model(config.model, config.lora),
               config.dpo.get("sft_weight", 0.0))
  if distill.enabled(config):
    return Distill(config.distill.alpha, config.distill.temperature,
                   distill.teacher_model(config))
  return CrossEntropy(chunk_len=loss_chunk_len(config))


def for_evaluation(config, eval_model=None) -> Any:
  """What evaluation measures: DPO's loss and accuracy for DPO, else the
  model's own cross-entropy (a distilled student's too: no teacher needed)."""
  if config.data.task == "preference":
    return for_config(config, eval_model)
  return CrossEntropy(chunk_len=loss_chunk_len(config))


def loss_chunk_len(config) -> int:
  """``model.loss_chunk_len`` where the chunked loss applies, else 0: the
  family has a vocabulary head that no Qwix provider (quantization, or a
  LoRA adapter whose ``lora.targets`` match it) intercepts, since the chunked
  loss applies that head's kernel itself."""
  chunk_len = config.model.get("loss_chunk_len", 0)
  if not chunk_len or config.model.get("num_classes", 0):
    return 0
  if quantization.qat_enabled(config.model) or quantization.weight_quantized(config.model):
    return 0
  if lora.enabled(config.lora) and any(
      re.fullmatch(lora.module_pattern(config.lora), name) for name in HEAD_MODULES):
    return 0
  return chunk_len


def needs_reference(config) -> bool:
  """Whether the train state keeps a frozen copy of the starting parameters
  (DPO without LoRA; with LoRA the base is the reference)."""
  return config.data.task == "preference" and not lora.enabled(config.lora)
