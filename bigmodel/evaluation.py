"""Evaluation metrics over a finite iterator of eval batches."""
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from bigmodel import sharding


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                           num_classes: int) -> dict[str, float]:
  """Accuracy, macro precision / recall / F1, and the majority-class baseline.

  A prediction of ``num_classes`` or more (a text-to-text answer that is no
  label) is wrong for every class. Classes that never occur and are never
  predicted do not count in the macro averages.
  """
  keep = weights > 0
  predictions, labels = predictions[keep].astype(int), labels[keep].astype(int)
  predictions = np.minimum(predictions, num_classes)
  # [true, predicted]; the extra column holds answers that are no class.
  confusion = np.zeros((num_classes, num_classes + 1), np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  confusion = confusion[:, :num_classes]
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
             label_token_ids: Optional[Sequence[Sequence[int]]] = None) -> dict[str, float]:
  """Weighted mean loss and accuracy (and perplexity, or classification metrics).

  ``num_classes`` > 0 adds precision / recall / F1; for text-to-text
  classification, ``label_token_ids`` are the labels' target token sequences.
  """
  loss_sum = weight_sum = correct_sum = 0.0
  predictions, labels, weights = [], [], []
  for host_batch in eval_batches:
    out = eval_fn(params, sharding.global_batch(host_batch, mesh))
    loss_sum, weight_sum = loss_sum + out["loss_sum"], weight_sum + out["weight_sum"]
    correct_sum = correct_sum + out["correct_sum"]
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
    metrics.update(classification_metrics(np.concatenate(predictions), np.concatenate(labels),
                                          np.concatenate(weights), num_classes))
  else:
    metrics["eval_perplexity"] = float(np.exp(min(loss, 50.0)))
  return metrics
