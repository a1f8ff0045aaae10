"""Chat templates and stop ids: rendering equals transformers', generation ends at every stop id.

Two tiny chat tokenizers are built in a temporary directory (a byte-level BPE
trained on a fixed text, as tests/fixtures/make_hf_fixtures.py's
gpt2_tokenizer): a Llama-3-style one (template in tokenizer_config.json,
three end-of-text ids in generation_config.json) and a Gemma-style one
(template in chat_template.jinja, no system role, end-of-turn found in the
template). The templates are written here in those models' styles.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
import transformers

from bigmodel.errors import UserError
from bigmodel.generation.sampling import Sampling
from bigmodel.hf.interop import TOKENIZER_DIR, import_hf
from bigmodel.hf.tokenizer import HfTokenizer, tokenizer_files
from commands import ROOT
from generate_fixtures import PROMPTS, tiny_generator

_GPT2 = os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2")
TEXT = ("the quick brown fox jumps over the lazy dog. " * 3
        + "def main(argv):\n    return sum(x * x for x in range(10))\n") * 4

# Block tags on their own lines: trim_blocks / lstrip_blocks decide the text.
LLAMA_TEMPLATE = """{{- bos_token -}}
{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('unknown role ' ~ message['role']) }}
  {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""
GEMMA_TEMPLATE = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
  {{ raise_exception('System role not supported') }}
{% endif %}
{% for message in messages %}
  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
  {% endif %}
  {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
<start_of_turn>{{ role }}
{{ message['content'] | trim }}<end_of_turn>
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
{% endif %}
"""
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Say hi."}],
    "multi_turn": [{"role": "user", "content": " the fox? "},
                   {"role": "assistant", "content": "It jumps."},
                   {"role": "user", "content": "And the dog?"}],
    "system": [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Sum of squares?"}],
}


def make_tokenizer(out: str, specials: list[str], bos: str, eos: str) -> None:
  """A byte-level BPE with ``specials`` saved by transformers into ``out``."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TEXT], trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.add_special_tokens(specials)
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                       eos_token=eos).save_pretrained(out)


def edit_json(path: str, **values) -> None:
  config = json.load(open(path)) if os.path.exists(path) else {}
  config.update(values)
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.fixture(name="llama_dir", scope="module")
def fixture_llama_dir(tmp_path_factory) -> str:
  """Llama 3 style: template in tokenizer_config.json, end-of-text ids listed in generation_config.json."""
  out = str(tmp_path_factory.mktemp("llama_chat"))
  make_tokenizer(out, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"],
                 bos="<|begin_of_text|>", eos="<|end_of_text|>")
  assert not os.path.exists(os.path.join(out, "chat_template.jinja"))
  edit_json(os.path.join(out, "tokenizer_config.json"), chat_template=LLAMA_TEMPLATE)
  tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  eos_ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
  edit_json(os.path.join(out, "generation_config.json"), eos_token_id=eos_ids)
  return out


@pytest.fixture(name="gemma_dir", scope="module")
def fixture_gemma_dir(tmp_path_factory) -> str:
  """Gemma style: template in chat_template.jinja, one eos, end-of-turn only in the template."""
  out = str(tmp_path_factory.mktemp("gemma_chat"))
  make_tokenizer(out, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                 bos="<bos>", eos="<eos>")
  with open(os.path.join(out, "chat_template.jinja"), "w") as f:
    f.write(GEMMA_TEMPLATE)
  return out


def theirs(directory: str, messages, add_generation_prompt: bool) -> str:
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  return tok.apply_chat_template(messages, tokenize=False,
                                 add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen_prompt", "no_gen"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_llama_style_rendering_equals_transformers(llama_dir, conversation,
                                                   add_generation_prompt):
  messages = CONVERSATIONS[conversation]
  ours = HfTokenizer(llama_dir).apply_chat_template(messages, add_generation_prompt)
  assert ours == theirs(llama_dir, messages, add_generation_prompt)
  assert ours.startswith("<|begin_of_text|><|start_header_id|>")
  assert ours.endswith("assistant<|end_header_id|>\n\n" if add_generation_prompt
                       else "<|eot_id|>\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen_prompt", "no_gen"])
def test_gemma_style_rendering_equals_transformers(gemma_dir, add_generation_prompt):
  messages = CONVERSATIONS["multi_turn"]
  ours = HfTokenizer(gemma_dir).apply_chat_template(messages, add_generation_prompt)
  assert ours == theirs(gemma_dir, messages, add_generation_prompt)
  assert "<start_of_turn>model\nIt jumps.<end_of_turn>\n" in ours


@pytest.mark.parametrize("messages,fragment", [
    (CONVERSATIONS["system"], "System role not supported"),
    (CONVERSATIONS["multi_turn"][:1] * 2, "roles must alternate"),
])
def test_raise_exception_in_a_template_is_a_user_error(gemma_dir, messages, fragment):
  with pytest.raises(Exception, match=fragment):  # transformers: jinja2's TemplateError.
    theirs(gemma_dir, messages, True)
  with pytest.raises(UserError, match=fragment) as error:
    HfTokenizer(gemma_dir).apply_chat_template(messages)
  assert "chat_template.jinja" in str(error.value)


def test_a_list_of_named_templates_uses_default(llama_dir, tmp_path):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(llama_dir, name)) as f, open(tmp_path / name, "w") as g:
      g.write(f.read())
  edit_json(str(tmp_path / "tokenizer_config.json"), chat_template=[
      {"name": "tool_use", "template": "tools!"},
      {"name": "default", "template": "{% for m in messages %}{{ m['content'] }};{% endfor %}"}])
  tokenizer = HfTokenizer(str(tmp_path))
  assert tokenizer.apply_chat_template(CONVERSATIONS["multi_turn"]) == (
      theirs(str(tmp_path), CONVERSATIONS["multi_turn"], True))
  assert tokenizer.chat_template.startswith("{% for m")


def test_stop_ids_come_from_generation_config_and_the_template(llama_dir, gemma_dir):
  llama = HfTokenizer(llama_dir)
  ids = [llama.encode(t)[0] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
  assert llama.eos_id == llama.pad_id == ids[0]  # No pad token (as Llama 3): eos pads.
  assert llama.stop_ids == tuple(ids)  # eos first, no repeats (<|eot_id|> is both).
  gemma = HfTokenizer(gemma_dir)
  assert gemma.stop_ids == (gemma.eos_id, gemma.encode("<end_of_turn>")[0])
  assert gemma.special_tokens.stop_ids == gemma.stop_ids


def test_without_template_or_with_a_broken_one(gemma_dir, tmp_path):
  plain = HfTokenizer(_GPT2)
  assert plain.chat_template is None
  assert plain.stop_ids == (plain.eos_id,)
  # No template: the built-in format that chat fine-tuning trains (bigmodel.data.chat).
  assert plain.apply_chat_template(CONVERSATIONS["system"]) == (
      "<|system|>\nBe brief.\n<|user|>\nSum of squares?\n<|assistant|>\n")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(gemma_dir, name)) as f, open(tmp_path / name, "w") as g:
      g.write(f.read())
  (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
  broken = HfTokenizer(str(tmp_path))  # Loads (training needs no template); chat fails.
  assert broken.stop_ids == (broken.eos_id,)
  with pytest.raises(UserError, match=r"chat_template\.jinja is not valid Jinja") as error:
    broken.apply_chat_template(CONVERSATIONS["user"])
  assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_the_companion_files_travel_with_a_tokenizer_only(gemma_dir, llama_dir):
  assert "chat_template.jinja" in tokenizer_files(gemma_dir)
  assert "generation_config.json" in tokenizer_files(llama_dir)
  # gpt2_sharded has a generation_config.json but no tokenizer: nothing is kept.
  assert tokenizer_files(os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2_sharded")) == []


# Generation: a row ends at any stop id, each row on its own.

class _Stops:
  """Mixed into a Generator's class: ``stop_ids`` set by the test (no tokenizer needed)."""
  test_stop_ids: tuple[int, ...] = ()

  @property
  def stop_ids(self):
    return self.test_stop_ids


@pytest.fixture(name="generator", scope="module")
def fixture_generator():
  generator = tiny_generator("gpt")
  generator.__class__ = type("WithStops", (_Stops, type(generator)), {})
  return generator


def unused_id(rows) -> int:
  """An id no row holds: a stop id that never fires."""
  return min(set(range(3, 128)) - {t for row in rows for t in row})


def test_greedy_rows_stop_at_a_second_stop_id(generator):
  free = generator.generate_ids(PROMPTS, max_new_tokens=12, stop_at_eos=False)
  second = free[0][3]
  generator.test_stop_ids = (unused_id(free), second)
  stopped = generator.generate_ids(PROMPTS, max_new_tokens=12)
  assert stopped[0] == free[0][:free[0].index(second)]
  for free_row, row in zip(free[1:], stopped[1:]):
    assert row == (free_row[:free_row.index(second)] if second in free_row else free_row)


def raw_output(generator, kind: str, stop_ids, **static) -> np.ndarray:
  """The decoding loop's tokens [B, 16] for PROMPTS: stop tokens kept, pad after them."""
  tokens_BxP = np.zeros((len(PROMPTS), 8), np.int32)
  for row, ids in enumerate(PROMPTS):
    tokens_BxP[row, 8 - len(ids):] = ids
  lengths_B = np.asarray([len(ids) for ids in PROMPTS], np.int32)
  loop = generator._loop(kind, 16, stop_ids=tuple(stop_ids), **static)  # pylint: disable=protected-access
  args = (generator.params, tokens_BxP, lengths_B, np.int32(12))
  if kind == "sample":
    args += (jax.random.key(0), Sampling(1.0).values())
  return np.asarray(loop(*args))


@pytest.mark.parametrize("kind,static", [
    ("sample", dict(static_key=Sampling(1.0).static_key())),
    ("beam", dict(num_beams=3, alpha=1.0)),
], ids=["sampling", "beam_search"])
def test_the_loops_end_a_row_at_any_stop_id(generator, kind, static):
  free_BxM = raw_output(generator, kind, (), **static)
  row0 = free_BxM[0, :12].tolist()
  # The second stop id: a token first emitted in row 0 after two others.
  at = next(i for i in range(2, 12) if row0[i] not in row0[:i])
  second = row0[at]
  stops = (unused_id(free_BxM[:, :12].tolist()), second)
  out_BxM = raw_output(generator, kind, stops, **static)
  assert out_BxM[0].tolist() != free_BxM[0].tolist()
  for row in out_BxM.tolist():  # After a row's first stop id: only padding.
    ends = [i for i, t in enumerate(row) if t in stops]
    assert all(t == generator.pad_id for t in row[ends[0] + 1:]) if ends else True
  if kind == "sample":  # Rows are independent: the same tokens up to the stop.
    assert out_BxM[0, :at + 1].tolist() == row0[:at + 1]
    assert not np.any(out_BxM[0, at + 1:12] != generator.pad_id)


# The model-level view: a converted model, its tokenizer's stop ids, the CLI.

@pytest.fixture(name="workdir", scope="module")
def fixture_workdir(tmp_path_factory) -> str:
  """The GPT-2 fixture converted: its tokenizer has no chat template."""
  workdir = str(tmp_path_factory.mktemp("chat_run") / "workdir")
  import_hf(_GPT2, "gpt2", workdir)
  return workdir


def test_chat_prompt_ids_equal_transformers_and_stop_at_end_of_turn(workdir, tmp_path):
  from bigmodel import api  # pylint: disable=g-import-not-at-top
  generator = api.load_generator(workdir)
  # No template: the built-in format, tokenized piece by piece as training does.
  encode = generator.tokenizer.encode
  assert generator.chat_prompt("hi") == [generator.bos_id, *encode("<|user|>\nhi\n"),
                                         *encode("<|assistant|>\n")]
  # A template whose turns end with <|endoftext|> (the only special token of
  # the GPT-2 fixture), without BOS: the prompt is its tokens as they are.
  tokenizer_dir = os.path.join(workdir, TOKENIZER_DIR)
  with open(os.path.join(tokenizer_dir, "chat_template.jinja"), "w") as f:
    f.write("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
  generator.tokenizer = HfTokenizer(tokenizer_dir)
  prompt = generator.chat_prompt("the lazy fox", system="be brief")
  expected = transformers.AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
      [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy fox"}],
      add_generation_prompt=True, tokenize=True)
  expected = expected["input_ids"] if "input_ids" in expected else expected  # A BatchEncoding.
  assert generator.prompt_ids(prompt, templated=True) == prompt == list(expected)
  assert generator.prompt_ids("the lazy fox")[0] == generator.bos_id  # Plain prompts get BOS.
  assert generator.stop_ids == (generator.eos_id,) == generator.tokenizer.stop_ids
  reply = generator.chat("the lazy fox", max_new_tokens=4)
  assert reply == generator.generate([prompt], max_new_tokens=4, templated=True)[0]


def test_cli_chat_without_a_template_uses_the_built_in_format(workdir):
  template = os.path.join(workdir, TOKENIZER_DIR, "chat_template.jinja")
  if os.path.exists(template):  # Added by the test above.
    os.remove(template)
  result = subprocess.run(
      [sys.executable, "-m", "bigmodel.generate", f"--workdir={workdir}", "--chat",
       "--prompt=hi", "--max_new_tokens=2"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_chat_fine_tuning_trains_exactly_the_replies_and_their_end_of_turn(
    style, llama_dir, gemma_dir):
  """The trained tokens of a templated conversation are each reply followed
  by the template's end-of-turn token; the ids are the rendered text's."""
  from bigmodel.data.chat import encode_chat  # pylint: disable=g-import-not-at-top
  tokenizer = HfTokenizer(llama_dir if style == "llama" else gemma_dir)
  messages = [{"role": "user", "content": "the fox?"},
              {"role": "assistant", "content": "It jumps."},
              {"role": "user", "content": "And the dog?"},
              {"role": "assistant", "content": "It sleeps."}]
  ids, trained = encode_chat(tokenizer, messages)
  assert ids.tolist() == tokenizer.encode(tokenizer.apply_chat_template(messages, False))
  end_of_turn = tokenizer.encode("<|eot_id|>" if style == "llama" else "<end_of_turn>")
  assert len(end_of_turn) == 1 and end_of_turn[0] in tokenizer.stop_ids
  starts = np.flatnonzero(np.diff(trained.astype(int), prepend=0) == 1)
  ends = np.flatnonzero(np.diff(trained.astype(int), append=0) == -1) + 1
  replies = [ids[a:b].tolist() for a, b in zip(starts, ends)]
  # Each trained span: the reply, its end-of-turn token, what the template
  # puts after it before the next turn (a newline here).
  for span, reply in zip(replies, ["It jumps.", "It sleeps."], strict=True):
    cut = span.index(end_of_turn[0])
    assert tokenizer.decode(span[:cut]).strip() == reply
    assert tokenizer.decode(span[cut + 1:]).strip() == ""
