"""``Generator``: a tokenizer and a run's checkpoint in front of the cached decoding loops.

Decoding uses key/value caches (``bigmodel.generation.models``) and is
compiled once per shape bucket: batch, prompt length and new-token count are
rounded up to powers of two (at least 16), so most calls reuse a compiled
program.

Prompts: GPT prompts start with BOS (an empty prompt is BOS alone); a prompt
that leaves fewer than ``max_new_tokens`` slots of the model's context
(``model.max_len``) is truncated from the left, and one line on stderr says
so. T5 prompts are the encoder input (+ EOS), truncated from the left to the
trained encoder length (``data.seq_len``); decoding starts from the
tokenizer's ``decoder_start_id`` (BOS for sentencepiece, pad for HF T5).

A row ends at any of the tokenizer's ``stop_ids`` (EOS, plus a chat model's
other end-of-text and end-of-turn ids), removed from the result with what
follows. ``chat`` wraps a message in the tokenizer's chat template first.
"""
import dataclasses
import functools
import math
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bigmodel import sharding
from bigmodel import run as run_lib
from bigmodel.data.chat import encode_chat_prompt
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.generation.models import CachedDecoder
from bigmodel.generation.sampling import Sampling
from bigmodel.generation.search import beam_loop, sample_loop
from bigmodel.models import families

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """``n`` rounded up to a power of two, at least ``minimum``: shapes recompile rarely."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass
class Generator:
  """A model, its parameters and tokenizer, ready to generate.

  Attributes:
    model: The Flax module (GPT or T5).
    params: Its parameters, placed on ``mesh``.
    config: The run's config.
    tokenizer: Text <-> ids (None: only ``generate_ids`` works).
    mesh: The device mesh decoding runs on (the cache is sharded like the
      activations: batch over data x fsdp, heads over tensor).
    max_batch: Prompts decoded together at most; more go in several batches.
  """
  model: Any
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: Optional[Tokenizer]
  mesh: jax.sharding.Mesh
  max_batch: int = 64
  step: Optional[int] = None  # The checkpoint's step, when loaded from one.

  def __post_init__(self):
    family = families.get(self.config.model.family)
    if not family.generates:
      able = " or ".join(f.name for f in families.FAMILIES.values() if f.generates)
      raise UserError(f"a {family.name} model does not generate text; use a {able} run")
    self.decoder = CachedDecoder(self.model)
    self.is_encoder_decoder = self.decoder.is_encoder_decoder
    self._compiled: dict[tuple, Any] = {}

  # Special ids: the tokenizer's, or the stack's fixed ones without one.
  @property
  def bos_id(self) -> int:
    return self.tokenizer.bos_id if self.tokenizer else 1

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id if self.tokenizer else 2

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end a row: the tokenizer's (EOS first), or EOS alone."""
    return getattr(self.tokenizer, "stop_ids", None) or (self.eos_id,)

  @property
  def decoder_start_id(self) -> int:
    """The first decoder input of an encoder-decoder (what its training fed)."""
    if not self.tokenizer:
      return 1
    # Tokenizers without the property (older ones) start from BOS.
    return getattr(self.tokenizer, "decoder_start_id", self.tokenizer.bos_id)

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id if self.tokenizer else 0

  @property
  def num_valid_ids(self) -> int:
    vocab = self.config.model.vocab_size
    return min(self.tokenizer.vocab_size, vocab) if self.tokenizer else vocab

  def prompt_ids(self, text: str | Sequence[int], templated: bool = False) -> list[int]:
    """A prompt's token ids: BOS + text (GPT) or text + EOS (T5 encoder).

    ``templated``: ``text`` is a chat prompt (``chat_prompt``: token ids, or
    a rendered chat template as text), which puts BOS where the model wants
    it (as transformers, a GPT prompt is its tokens as they are).
    """
    if self.tokenizer is None:
      raise UserError("this run has no tokenizer (synthetic data); it can only generate ids")
    if templated and not isinstance(text, str):
      return list(text)
    ids = self.tokenizer.encode(text)
    if self.is_encoder_decoder:
      return ids + [self.eos_id]
    return ids if templated else [self.bos_id] + ids

  def _fit(self, ids: Sequence[int], max_new_tokens: int, index: int) -> tuple[list[int], int]:
    """(prompt ids kept, new tokens allowed) within the model's context."""
    ids = list(ids) or ([self.eos_id] if self.is_encoder_decoder else [self.bos_id])
    if self.is_encoder_decoder:
      room = self.config.data.seq_len
    else:
      context = self.config.model.max_len
      max_new_tokens = min(max_new_tokens, context - 1)
      room = context - max_new_tokens
    if len(ids) > room:
      print(f"prompt {index}: {len(ids)} tokens; kept the last {room} to fit the context",
            file=sys.stderr, flush=True)
      ids = ids[-room:]
    return ids, max_new_tokens

  def _loop(self, kind: str, num_new: int, **static) -> Any:
    """The jitted loop for these static settings (it retraces per shape bucket)."""
    key = (kind, num_new, tuple(sorted(static.items())))
    if key not in self._compiled:
      fn = sample_loop if kind == "sample" else beam_loop
      self._compiled[key] = jax.jit(functools.partial(
          fn, self.decoder, num_new=num_new, pad_id=self.pad_id, start_id=self.decoder_start_id,
          num_valid_ids=self.num_valid_ids, **static))
    return self._compiled[key]

  def _place(self, x: np.ndarray) -> jax.Array:
    dp = sharding.data_parallel_size(self.mesh)
    spec = P(sharding.BATCH_AXES) if x.shape[0] % dp == 0 else P()
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   sampling: Sampling = Sampling(), num_beams: int = 1,
                   length_penalty: float = 1.0, seed: int = 0,
                   stop_at_eos: bool = True) -> list[list[int]]:
    """New token ids per prompt (the first stop id and what follows removed).

    ``stop_at_eos``: end rows at ``stop_ids``; False runs every row to
    ``max_new_tokens``.

    A prompt's result does not depend on the others in its batch (greedy
    and beam search; sampled rows share one random stream per batch).
    """
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_beams < 1:
      raise UserError(f"num_beams must be at least 1, got {num_beams}")
    fitted = [self._fit(ids, max_new_tokens, i) for i, ids in enumerate(prompts)]
    results = []
    for start in range(0, len(fitted), self.max_batch):
      results += self._generate_batch(fitted[start:start + self.max_batch], sampling,
                                      num_beams, length_penalty, seed + start, stop_at_eos)
    return results

  def _generate_batch(self, fitted, sampling, num_beams, length_penalty, seed, stop_at_eos):
    max_new = max(n for _, n in fitted)
    num_new = bucket(max_new)
    dp = sharding.data_parallel_size(self.mesh)
    batch = math.lcm(bucket(len(fitted), minimum=1), dp)
    prompt_len = bucket(max(len(ids) for ids, _ in fitted))
    tokens_BxP = np.full((batch, prompt_len), self.pad_id, np.int32)
    lengths_B = np.ones((batch,), np.int32)  # Filler rows: one token.
    tokens_BxP[:, 0 if self.is_encoder_decoder else -1] = self.bos_id
    for row, (ids, _) in enumerate(fitted):
      if self.is_encoder_decoder:  # Right padding: relative positions need no shift.
        tokens_BxP[row, :len(ids)] = ids
      else:  # Left padding: every row's next token goes in the same cache slot.
        tokens_BxP[row] = self.pad_id
        tokens_BxP[row, prompt_len - len(ids):] = ids
      lengths_B[row] = len(ids)
    stop_ids = self.stop_ids if stop_at_eos else ()
    with sharding.activate(self.mesh):
      tokens_BxP, lengths_B = self._place(tokens_BxP), self._place(lengths_B)
      if num_beams > 1:
        loop = self._loop("beam", num_new, num_beams=num_beams, alpha=float(length_penalty),
                          stop_ids=stop_ids)
        out_BxM = loop(self.params, tokens_BxP, lengths_B, jnp.int32(max_new))
      else:
        loop = self._loop("sample", num_new, static_key=sampling.static_key(),
                          stop_ids=stop_ids)
        out_BxM = loop(self.params, tokens_BxP, lengths_B, jnp.int32(max_new),
                       jax.random.key(seed), sampling.values())
    if not out_BxM.is_fully_addressable:  # Several processes: every one gets all rows.
      out_BxM = multihost_utils.process_allgather(out_BxM, tiled=True)
    out_BxM = np.asarray(jax.device_get(out_BxM))
    results = []
    for row, (_, allowed) in enumerate(fitted):
      ids = out_BxM[row, :allowed].tolist()
      ends = [i for i, token in enumerate(ids) if token in stop_ids]
      results.append(ids[:ends[0]] if ends else ids)
    return results

  def generate(self, prompts: str | Sequence[str | Sequence[int]], *,
               max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               num_beams: int = 1, length_penalty: float = 1.0,
               stop: Sequence[str] = (), seed: int = 0, templated: bool = False) -> list[str]:
    """Completions of ``prompts`` (the new text only), cut at a stop id or string.

    Stop strings cut the text; decoding itself runs to a stop id or
    ``max_new_tokens``. ``templated``: the prompts are chat prompts
    (``chat_prompt``'s ids, or rendered templates), taken as they are.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    try:
      sampling = Sampling(temperature, top_k, top_p)
    except ValueError as e:
      raise UserError(str(e)) from e
    ids = self.generate_ids([self.prompt_ids(p, templated) for p in prompts],
                            max_new_tokens=max_new_tokens, sampling=sampling,
                            num_beams=num_beams, length_penalty=length_penalty, seed=seed)
    texts = [self.tokenizer.decode(row) for row in ids]
    return [_cut_at_stop(text, stop) for text in texts]

  def chat_prompt(self, message: str, system: Optional[str] = None) -> list[int]:
    """The token ids of one user ``message`` (after an optional ``system``
    one) in the model's chat format, ending with the start of the
    assistant's turn (``bigmodel.data.chat``: its template, else the
    built-in format chat fine-tuning trains)."""
    if self.tokenizer is None:
      raise UserError("this run has no tokenizer (synthetic data); it cannot chat")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": message})
    return encode_chat_prompt(self.tokenizer, messages)

  def chat(self, message: str, system: Optional[str] = None, **kwargs) -> str:
    """The assistant's reply to ``message`` (``chat_prompt``), stopping at the
    end-of-turn token; ``kwargs``: ``generate``'s settings."""
    return self.generate([self.chat_prompt(message, system)], templated=True, **kwargs)[0]


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
  cuts = [text.find(s) for s in stop if s and s in text]
  return text[:min(cuts)] if cuts else text


def load(workdir: str, step: Optional[int] = None,
         mesh_config: Optional[dict] = None) -> Generator:
  """A ``Generator`` for a run's checkpoint (default: the latest).

  ``mesh_config`` ({"data", "fsdp", "tensor"} sizes, one may be -1; default:
  the run's own mesh, see ``bigmodel.run.load_run``) places the parameters and
  the cache. Raises UserError for a missing workdir or checkpoint.
  """
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_config)) if mesh_config else None
  run = run_lib.load_run(workdir, step, mesh)
  return Generator(run.model, run.params, run.config, run.tokenizer, run.mesh, step=run.step)
