"""Generation: cached decoding equals full-forward re-decoding, strategies, the CLI."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.generation import sampling
from bigmodel.generation.generator import bucket
from bigmodel.generation.reference import full_forward_greedy
from generate_fixtures import PROMPTS, tiny_generator

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
NUM_NEW = 12


@functools.lru_cache(maxsize=None)
def shared_generator(family: str):
  """One generator per family for the tests below, so compiled loops are reused."""
  return tiny_generator(family)


@functools.lru_cache(maxsize=None)
def oracle(family: str) -> list[list[int]]:
  """Full-forward greedy tokens of each prompt alone (the shared generator's model)."""
  generator = shared_generator(family)
  return [full_forward_greedy(generator.model, generator.params, jnp.asarray([prompt]),
                              NUM_NEW)[0].tolist() for prompt in PROMPTS]


@pytest.mark.parametrize("family,overrides", [
    ("gpt", {}),
    ("gpt", dict(position_embedding="rope", num_kv_heads=2, scan=False)),
    ("t5", {}),
    # Windows narrower than prompt + new tokens: local layers keep rings of
    # the window's keys, Gemma's global layers every key.
    ("gemma", {}),
    ("mistral", dict(scan=False)),
    ("llama", {}),
])
def test_cached_greedy_equals_full_forward_and_batching_changes_nothing(family, overrides):
  """Prompts of different lengths decoded in one padded batch give, token for
  token, what re-running the whole forward pass on each prompt alone gives."""
  if overrides:
    generator = tiny_generator(family, **overrides)
    want = [full_forward_greedy(generator.model, generator.params, jnp.asarray([prompt]),
                                NUM_NEW)[0].tolist() for prompt in PROMPTS]
  else:
    generator, want = shared_generator(family), oracle(family)
  cached = generator.generate_ids(PROMPTS, max_new_tokens=NUM_NEW, stop_at_eos=False)
  assert cached == want
  # The outputs depend on the prompt (a cache or mask bug would blur them).
  assert len({tuple(c) for c in cached}) == len(PROMPTS)


@pytest.mark.parametrize("family", ["gpt", "t5", "gemma"])
def test_beam_search_batched_equals_alone(family):
  generator = shared_generator(family)
  beam = dict(max_new_tokens=8, num_beams=4, length_penalty=0.0, stop_at_eos=False)
  batched = generator.generate_ids(PROMPTS, **beam)
  alone = [generator.generate_ids([p], **beam)[0] for p in PROMPTS]
  assert batched == alone
  assert all(len(ids) == 8 for ids in batched)
  if family == "gpt":
    # With no length penalty the beam's pick is at least as likely as greedy's.
    greedy = generator.generate_ids(PROMPTS, max_new_tokens=8, stop_at_eos=False)
    log_prob = jax.jit(functools.partial(_log_prob, generator.model))
    for prompt, beam_ids, greedy_ids in zip(PROMPTS, batched, greedy):
      assert beam_ids != greedy_ids or prompt is PROMPTS[1]
      assert (float(log_prob(generator.params, jnp.asarray([prompt + beam_ids])))
              >= float(log_prob(generator.params, jnp.asarray([prompt + greedy_ids]))) - 1e-4)


def _log_prob(model, params, tokens_1xL, num_new=8):
  """log p(the last ``num_new`` tokens | the ones before) by one forward pass."""
  logp_LxV = jax.nn.log_softmax(model.apply({"params": params}, tokens_1xL)[0, :-1], axis=-1)
  targets_L = tokens_1xL[0, 1:]
  return jnp.take_along_axis(logp_LxV, targets_L[:, None], axis=1)[-num_new:].sum()


def test_eos_stops_a_row_and_max_new_tokens_is_respected():
  generator = tiny_generator("gpt")  # Not shared: its eos_id is changed below.
  free = generator.generate_ids(PROMPTS, max_new_tokens=12, stop_at_eos=False)
  # Pretend the 4th token of the first row is end-of-text: that row stops
  # there (EOS removed), the other rows are unchanged.
  eos = free[0][3]
  generator.tokenizer = None
  generator.__class__ = type("EosAt", (type(generator),), {"eos_id": property(lambda s: eos)})
  stopped = generator.generate_ids(PROMPTS, max_new_tokens=12)
  assert stopped[0] == free[0][:free[0].index(eos)]
  for free_row, row in zip(free[1:], stopped[1:]):
    assert row == (free_row[:free_row.index(eos)] if eos in free_row else free_row)
  assert [len(r) for r in generator.generate_ids(PROMPTS, max_new_tokens=3,
                                                 stop_at_eos=False)] == [3, 3, 3]


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  values = sampling.Sampling(1.0, top_k=2, top_p=1.0).values()
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, values, use_top_k=True,
                                                       use_top_p=False)))
  assert kept.tolist() == [[True, True, False, False]]
  values = sampling.Sampling(1.0, top_k=0, top_p=0.85).values()
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, values, use_top_k=False,
                                                       use_top_p=True)))
  assert kept.tolist() == [[True, True, True, False]]  # 0.5 + 0.3 < 0.85: the third is needed.
  # Sampling with top_k=1 is greedy; temperature sharpens towards the argmax.
  draws = [int(sampling.next_token(logits, jax.random.key(i), sampling.Sampling(1.0, 1).values(),
                                   static_key=(False, True, False))[0]) for i in range(5)]
  assert draws == [0] * 5
  hot = sampling.next_token(jnp.tile(logits, (2000, 1)), jax.random.key(0),
                            sampling.Sampling(1.0).values(), static_key=(False, False, False))
  assert 0.4 < float(np.mean(np.asarray(hot) == 0)) < 0.6
  assert sampling.mask_invalid(logits, 2)[0, 2] == -jnp.inf
  with pytest.raises(ValueError):
    sampling.Sampling(top_p=0.0)
  assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_sharded_decoding_equals_full_forward_on_eight_devices():
  out = subprocess.run([sys.executable, os.path.join(_HERE, "generate_sharded.py")],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for family in ("gpt", "t5"):
    assert results[family]["devices"] > 1  # The parameters really are split.
    assert results[family]["cached"] == oracle(family), family


# --- The command line on a trained workdir (fixture gpt_workdir: tests/conftest.py).


def run_module(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=_ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_generate_cli(gpt_workdir, tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  long_prompt = "x = 1\n" * 40  # Far more than 64 - 8 tokens.
  prompts_file.write_text("def add(a, b):\n\n")  # A real prompt and an empty one.
  result = run_module("bigmodel.generate", f"--workdir={gpt_workdir}",
                      f"--prompts_file={prompts_file}", f"--prompt={long_prompt}",
                      "--max_new_tokens=8", "--top_k=5", "--temperature=0.8", "--seed=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert [line for line in result.stdout.splitlines() if line.startswith("-----")] == [
      "----- 0 -----", "----- 1 -----", "----- 2 -----"]
  truncated = [line for line in result.stderr.splitlines() if "to fit the context" in line]
  # --prompt comes first, then the file's lines.
  assert len(truncated) == 1 and truncated[0].startswith("prompt 0:")
  assert "kept the last 56" in truncated[0]
  # The Python API gives the same text as the command line.
  from bigmodel import api  # pylint: disable=g-import-not-at-top
  generator = api.load_generator(gpt_workdir)
  assert generator.step == 2
  texts = generator.generate([long_prompt, "def add(a, b):", ""], max_new_tokens=8, top_k=5,
                             temperature=0.8, seed=3)
  printed = result.stdout.split("----- ")[1:]
  assert [p.split("-----\n", 1)[1].rstrip("\n") for p in printed] == texts


@pytest.mark.parametrize("make_workdir,fragment", [
    (lambda tmp: str(tmp / "missing"), "does not exist"),
    (lambda tmp: str(tmp), "no checkpoints in"),
])
def test_generate_bad_workdir_is_one_error_line(tmp_path, make_workdir, fragment):
  result = run_module("bigmodel.generate", f"--workdir={make_workdir(tmp_path)}", "--prompt=x")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and fragment in last, result.stderr
  assert "Traceback" not in result.stderr
