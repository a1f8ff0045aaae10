"""Evaluation metrics over a finite iterator of eval batches."""
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from bigmodel import sharding
from bigmodel.models import families


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Counts [true class, predicted class] of the examples with weight > 0.

  A prediction of ``num_classes`` or more (a text-to-text answer that is no
  label) is counted in no column: wrong for every class.
  """
  keep = weights > 0
  predictions, labels = predictions[keep].astype(int), labels[keep].astype(int)
  # The extra column holds the answers that are no class, then is dropped.
  confusion = np.zeros((num_classes, num_classes + 1), np.int64)
  np.add.at(confusion, (labels, np.minimum(predictions, num_classes)), 1)
  return confusion[:, :num_classes]


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                           num_classes: int) -> dict[str, float]:
  """Accuracy, macro precision / recall / F1, and the majority-class baseline.

  Predictions as in ``confusion_matrix``. Classes that never occur and are
  never predicted do not count in the macro averages.
  """
  confusion = confusion_matrix(predictions, labels, weights, num_classes)
  labels = labels[weights > 0].astype(int)
  true_positives = np.diag(confusion).astype(float)
  predicted, actual = confusion.sum(0), np.bincount(labels, minlength=num_classes)
  present = (predicted + actual) > 0
  precision = np.divide(true_positives, predicted, out=np.zeros(num_classes), where=predicted > 0)
  recall = np.divide(true_positives, actual, out=np.zeros(num_classes), where=actual > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                 where=(precision + recall) > 0)
  total = max(len(labels), 1)
  return {
      "eval_accuracy": float(true_positives.sum() / total),
      "eval_precision": float(precision[present].mean()) if present.any() else 0.0,
      "eval_recall": float(recall[present].mean()) if present.any() else 0.0,
      "eval_f1": float(f1[present].mean()) if present.any() else 0.0,
      "eval_majority_baseline": float(actual.max() / total) if len(labels) else 0.0,
      "eval_examples": float(len(labels)),
  }


def text_to_class(predicted_BxL: np.ndarray, loss_mask_BxL: np.ndarray,
                  label_token_ids: Sequence[Sequence[int]]) -> np.ndarray:
  """Class ids [B] of teacher-forced text-to-text predictions.

  A row's predicted tokens at its target positions are looked up among the
  labels' token sequences; no match is class ``len(label_token_ids)`` (wrong
  for every class).
  """
  lookup = {tuple(ids): i for i, ids in enumerate(label_token_ids)}
  return np.array([lookup.get(tuple(row[mask > 0]), len(label_token_ids))
                   for row, mask in zip(predicted_BxL, loss_mask_BxL)], np.int64)


def evaluate(eval_fn: Callable, params, eval_batches: Iterable[dict[str, np.ndarray]], mesh,
             num_classes: int = 0,
             label_token_ids: Optional[Sequence[Sequence[int]]] = None,
             with_confusion: bool = False, reference: Any = None) -> dict[str, Any]:
  """Weighted mean loss and accuracy (and perplexity, DPO's reward margin, or
  classification metrics).

  ``eval_fn`` is ``train_step.jit_eval_step``'s; ``reference`` DPO's frozen
  reference parameters. ``num_classes`` > 0 adds precision / recall / F1 (and, ``with_confusion``,
  ``eval_confusion``: the ``confusion_matrix`` as nested lists); for
  text-to-text classification, ``label_token_ids`` are the labels' target
  token sequences.
  """
  loss_sum = weight_sum = correct_sum = margin_sum = 0.0
  preference = False
  predictions, labels, weights = [], [], []
  for host_batch in eval_batches:
    out = eval_fn(params, sharding.global_batch(host_batch, mesh), reference)
    loss_sum, weight_sum = loss_sum + out["loss_sum"], weight_sum + out["weight_sum"]
    correct_sum = correct_sum + out["correct_sum"]
    if "reward_margin_sum" in out:
      preference, margin_sum = True, margin_sum + out["reward_margin_sum"]
    if num_classes:
      fetched = jax.device_get({k: out[k] for k in ("predictions", "labels", "example_mask",
                                                    "target_mask")})
      if label_token_ids is not None:
        fetched["predictions"] = text_to_class(fetched["predictions"], fetched["target_mask"],
                                               label_token_ids)
      predictions.append(fetched["predictions"])
      labels.append(fetched["labels"])
      weights.append(fetched["example_mask"])
  weight_sum = max(float(weight_sum), 1.0)
  loss = float(loss_sum) / weight_sum
  metrics = {"eval_loss": loss, "eval_accuracy": float(correct_sum) / weight_sum}
  if num_classes:
    predictions, labels, weights = (np.concatenate(predictions), np.concatenate(labels),
                                    np.concatenate(weights))
    metrics.update(classification_metrics(predictions, labels, weights, num_classes))
    if with_confusion:
      metrics["eval_confusion"] = confusion_matrix(predictions, labels, weights,
                                                   num_classes).tolist()
  elif preference:  # DPO: the accuracy is the preference accuracy.
    metrics["eval_reward_margin"] = float(margin_sum) / weight_sum
  else:
    metrics["eval_perplexity"] = float(np.exp(min(loss, 50.0)))
  return metrics


def classification_eval_args(config, datasets) -> dict[str, Any]:
  """``evaluate``'s class count, and the labels' target tokens for text-to-text
  classification; empty for the other tasks."""
  if config.data.task != "classify":
    return {}
  names = datasets.label_names
  args: dict[str, Any] = {"num_classes": len(names)}
  if families.get(config.model.family).encoder_decoder:  # Text-to-text classification.
    tokenizer, length = datasets.tokenizer, datasets.decoder_length
    args["label_token_ids"] = [(tokenizer.encode(name) + [tokenizer.eos_id])[:length]
                               for name in names]
  return args
