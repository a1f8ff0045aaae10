"""``BigmodelLM``: a bigmodel run behind lm-evaluation-harness's ``LM`` interface.

Registered with lm-eval as ``bigmodel`` (``lm_eval.api.registry``) once this
module is imported. It wraps a model, its parameters, the run's config,
tokenizer and mesh: a loaded run (``bigmodel.run.load_run``), a workdir, or
the pieces a trainer holds (:class:`ModelPieces`), so a training hook can
evaluate the current parameters without a checkpoint.

Text becomes token ids the way bigmodel trained them and lm-eval's Hugging
Face backend splits them:

- decoder prompts are BOS + text (as training's ``bos + text + eos`` and the
  ``Generator``); T5 encoder inputs are text + EOS;
- a (context, continuation) pair moves the context's trailing whitespace to
  the continuation; a decoder encodes BOS + context + continuation as a whole
  and splits where BOS + context's own tokens end (so a continuation with or
  without a leading space gets the tokens the whole text has); T5 encodes the
  two separately (the continuation without special tokens);
- an empty context is BOS (decoder) or EOS alone (T5's encoder).

``loglikelihood`` and ``loglikelihood_rolling`` score with
``bigmodel.lm_eval.scoring.TokenScorer`` (jitted forward, shape buckets);
``generate_until`` decodes with the KV-cache ``Generator``. BERT has no
left-to-right likelihood and is refused with one ``UserError``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from absl import logging
import jax
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from bigmodel import run as run_lib
from bigmodel.errors import UserError
from bigmodel.generation.generator import Generator
from bigmodel.generation.sampling import Sampling
from bigmodel.lm_eval.scoring import TokenScorer
from bigmodel.models import families

DEFAULT_BATCH_SIZE = 8
# lm-eval's own default for generation tasks that name no max_gen_toks.
DEFAULT_MAX_GEN_TOKS = 256
_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@dataclasses.dataclass
class ModelPieces:
  """What evaluation needs of a run, wherever it comes from.

  Attributes:
    model: The Flax module (``build_model``).
    params: Its parameters, placed on ``mesh``.
    config: The run's config (``model.*``, ``data.seq_len`` and
      ``data.target_len`` are read).
    tokenizer: The run's ``bigmodel.data.tokenizer.Tokenizer``.
    mesh: The device mesh the parameters live on.
    step: The checkpoint's (or training) step, if known.
  """
  model: Any
  params: Any
  config: Any
  tokenizer: Any
  mesh: jax.sharding.Mesh
  step: Optional[int] = None


def model_pieces(run_or_pieces: Any, step: Optional[int] = None) -> ModelPieces:
  """:class:`ModelPieces` of a workdir (its checkpoint ``step``, default the
  latest), a ``LoadedRun``, a mapping with the pieces' names, or any object
  with those attributes (``ModelPieces`` itself)."""
  if isinstance(run_or_pieces, str):
    run_or_pieces = run_lib.load_run(run_or_pieces, step)
  if isinstance(run_or_pieces, dict):
    return ModelPieces(**run_or_pieces)
  names = [f.name for f in dataclasses.fields(ModelPieces)]
  missing = [n for n in names[:5] if not hasattr(run_or_pieces, n)]
  if missing:
    raise TypeError(f"{type(run_or_pieces).__name__} has no {', '.join(missing)}: give a "
                    "workdir, a LoadedRun or ModelPieces")
  return ModelPieces(**{n: getattr(run_or_pieces, n, None) for n in names})


def check_scorable(config: Any, tokenizer: Any) -> None:
  """Raises UserError unless the run can be scored by lm-eval: a decoder or
  encoder-decoder (not BERT) with a tokenizer."""
  family = families.get(config.model.family)
  if not (family.is_causal_lm or family.encoder_decoder):
    raise UserError(f"a {family.name} model cannot be evaluated with lm-eval: it is a "
                    "bidirectional encoder with no left-to-right likelihood or generation; "
                    "use a gpt (decoder) or t5 (encoder-decoder) run")
  if tokenizer is None:
    raise UserError("this run has no tokenizer (synthetic data): lm-eval tasks are text")


def _cut(text: str, until: Sequence[str]) -> str:
  """``text`` up to the first occurrence of any non-empty ``until`` string."""
  cuts = [text.find(s) for s in until if s and s in text]
  return text[:min(cuts)] if cuts else text


def _sampling(gen_kwargs: dict[str, Any]) -> Sampling:
  """lm-eval's generation settings as bigmodel's: greedy unless ``do_sample``
  (or, without it, a positive ``temperature``), as transformers decides."""
  temperature = float(gen_kwargs.get("temperature") or 0.0)
  do_sample = gen_kwargs.get("do_sample")
  if do_sample is None:
    do_sample = temperature > 0
  if not do_sample:
    return Sampling()
  try:
    return Sampling(temperature=temperature or 1.0, top_k=int(gen_kwargs.get("top_k") or 0),
                    top_p=float(gen_kwargs.get("top_p") or 1.0))
  except ValueError as e:
    raise UserError(f"generation settings {gen_kwargs}: {e}") from e


@register_model("bigmodel")
class BigmodelLM(LM):
  """lm-eval's ``LM`` over a bigmodel run (decoder or T5).

  Built by lm-eval from ``--model bigmodel --model_args workdir=W[,step=S]``
  (with ``batch_size``), or in Python from ``run=`` (anything
  :func:`model_pieces` takes).

  Args:
    workdir: A run's directory (its checkpoint ``step``, default the latest).
    step: The checkpoint step with ``workdir``.
    batch_size: Rows per compiled forward pass or generation batch; "auto"
      or None is the default (8).
    max_batch_size: Accepted for lm-eval's interface; unused.
    device: Accepted for lm-eval's interface; the run's mesh places everything.
    run: Instead of ``workdir``: a ``LoadedRun``, ``ModelPieces`` or mapping.
  """

  def __init__(self, workdir: Optional[str] = None, step: Optional[int] = None,
               batch_size: Any = DEFAULT_BATCH_SIZE, max_batch_size: Any = None,
               device: Any = None, run: Any = None):
    super().__init__()
    del max_batch_size, device
    if (workdir is None) == (run is None):
      raise UserError("give the bigmodel lm-eval model a workdir or a loaded run (one of them)")
    pieces = model_pieces(run if run is not None else str(workdir), step)
    check_scorable(pieces.config, pieces.tokenizer)
    self.pieces = pieces
    self.tokenizer = pieces.tokenizer
    self.config = pieces.config
    self.batch_size = _batch_size(batch_size)
    family = families.get(self.config.model.family)
    self.encoder_decoder = family.encoder_decoder
    data = self.config.data
    if self.encoder_decoder:
      # The lengths training used; T5's relative positions would take more,
      # but the model never learned them.
      self.max_length = int(data.get("target_len") or data.seq_len)
      self.encoder_length = int(data.seq_len)
    else:
      self.max_length = int(self.config.model.max_len)
      self.encoder_length = 0
    self.scorer = TokenScorer(pieces.model, pieces.params, pieces.mesh, self.max_length,
                              encoder_len=self.encoder_length, batch_size=self.batch_size,
                              decoder_start_id=self.tokenizer.decoder_start_id,
                              pad_id=self.tokenizer.pad_id)
    self._generator: Optional[Generator] = None

  # --- Text to ids.

  def context_ids(self, text: str) -> list[int]:
    """A prompt's ids: BOS + text (decoder), text + EOS (T5's encoder)."""
    ids = self.tokenizer.encode(text) if text else []
    if self.encoder_decoder:
      return ids + [self.tokenizer.eos_id]
    return [self.tokenizer.bos_id] + ids

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a request, split as the module docstring says."""
    stripped = context.rstrip()
    # Whitespace belongs to the word after it: "Answer: " + "x" scores " x".
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = self.context_ids(context)
    if self.encoder_decoder or not context:
      return context_ids, self.tokenizer.encode(continuation) if continuation else []
    whole = self.context_ids(context + continuation)
    return context_ids, whole[len(context_ids):]

  # --- lm-eval's interface.

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per ``Instance.args`` (context, continuation)."""
    del disable_tqdm
    args = [request.args for request in requests]
    results = self.scorer.score([self.encode_pair(context, continuation)
                                 for context, continuation in args])
    for arg, result in zip(args, results):
      self.cache_hook.add_partial("loglikelihood", arg, result)
    return results

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) windows covering ``text``'s tokens once each
    (lm-eval's rolling windows, context made disjoint): the first predicted
    after BOS (decoder) or from an empty encoder input (T5), each later one
    after as many preceding tokens as the model's context leaves room for."""
    tokens = self.tokenizer.encode(text) if text else []
    # -1 stands for "nothing before the text": BOS for a decoder, an empty
    # encoder input (EOS alone) for T5.
    windows = map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=-1, max_seq_len=self.max_length, context_len=1))
    pairs = []
    for context, predicted in windows:
      if self.encoder_decoder:
        context = [t for t in context if t != -1] + [self.tokenizer.eos_id]
      else:
        context = [self.tokenizer.bos_id if t == -1 else t for t in context]
      pairs.append((context, list(predicted)))
    return pairs

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log p(text) per ``Instance.args`` (text,), the sum over its rolling windows."""
    del disable_tqdm
    texts = [request.args[0] for request in requests]
    windows = [self.rolling_windows(text) for text in texts]
    # Every window of every text in one call: batches fill across documents.
    scores = self.scorer.score([pair for text_windows in windows for pair in text_windows])
    results, start = [], 0
    for text, text_windows in zip(texts, windows):
      total = sum(logp for logp, _ in scores[start:start + len(text_windows)])
      start += len(text_windows)
      results.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
    return results

  @property
  def generator(self) -> Generator:
    """The KV-cache ``Generator`` over the same parameters (built on first use)."""
    if self._generator is None:
      p = self.pieces
      self._generator = Generator(p.model, p.params, p.config, p.tokenizer, p.mesh,
                                  max_batch=self.batch_size, step=p.step)
    return self._generator

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """The continuation of each ``Instance.args`` (context, gen_kwargs), cut at
    ``until`` and at most ``max_gen_toks`` tokens (default 256)."""
    del disable_tqdm
    groups: dict[tuple, list[int]] = {}
    settings = []
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args
      gen_kwargs = dict(gen_kwargs or {})
      ignored = sorted(set(gen_kwargs) - _GEN_KWARGS)
      if ignored:
        logging.warning("bigmodel lm-eval: ignoring generation settings %s", ignored)
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(gen_kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_TOKS)
      sampling = _sampling(gen_kwargs)
      settings.append(until)
      groups.setdefault((max_new, sampling), []).append(i)
    results = [""] * len(requests)
    for (max_new, sampling), indices in groups.items():
      prompts = [self.generator.prompt_ids(requests[i].args[0]) for i in indices]
      new_ids = self.generator.generate_ids(prompts, max_new_tokens=max_new, sampling=sampling)
      for i, ids in zip(indices, new_ids):
        results[i] = _cut(self.tokenizer.decode(ids), settings[i])
        self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
    return results

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records about the model in its results."""
    return {"family": self.config.model.family, "step": self.pieces.step,
            "max_length": self.max_length}


def _batch_size(value: Any) -> int:
  if value is None or (isinstance(value, str) and value.startswith("auto")):
    return DEFAULT_BATCH_SIZE
  try:
    size = int(value)
  except ValueError as e:
    raise UserError(f"batch_size must be a positive integer, got {value!r}") from e
  if size < 1:
    raise UserError(f"batch_size must be a positive integer, got {value!r}")
  return size
