"""Chat fine-tuning (data.task=chat): what is trained, packing, bad files, the run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.data import build_datasets, chat
from bigmodel.data.records import read_task_file
from bigmodel.data.tokenizer import SentencePieceTokenizer
from bigmodel.errors import UserError
from bigmodel.models import build_model
from commands import assert_user_error, run_train
from model_fixtures import apply, init_params, tiny_config

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What does sum do?"},
                {"role": "assistant", "content": "It adds the items."},
                {"role": "user", "content": "And len?"},
                {"role": "assistant", "content": "It counts them."}]


@pytest.fixture(name="tokenizer", scope="module")
def fixture_tokenizer(tokenizer_file):
  return SentencePieceTokenizer.load(tokenizer_file)


def _replace(messages, index, content):
  return [dict(m, content=content) if i == index else m for i, m in enumerate(messages)]


def test_built_in_format_trains_exactly_the_replies_and_their_eos(tokenizer):
  ids, trained = chat.encode_chat(tokenizer, CONVERSATION)
  assert ids[0] == tokenizer.bos_id and not trained[0]
  want = (tokenizer.encode("It adds the items.") + [tokenizer.eos_id]
          + tokenizer.encode("It counts them.") + [tokenizer.eos_id])
  assert ids[trained].tolist() == want
  # The prompt pieces are those generation feeds (chat_prompt): the first
  # reply starts right where encode_chat_prompt of the turns before it ends.
  prompt = chat.encode_chat_prompt(tokenizer, CONVERSATION[:2])
  assert ids[:len(prompt)].tolist() == prompt and trained[len(prompt)]
  assert not trained[:len(prompt)].any()


def test_changing_the_prompt_changes_no_trained_token(tokenizer):
  """Another user message (other length, other tokens) moves the replies but
  trains exactly the same tokens; another reply changes what is trained."""
  _, trained = chat.encode_chat(tokenizer, CONVERSATION)
  ids, _ = chat.encode_chat(tokenizer, CONVERSATION)
  other_ids, other_trained = chat.encode_chat(
      tokenizer, _replace(CONVERSATION, 1, "Explain the builtin sum, please."))
  assert len(other_ids) != len(ids)
  assert other_ids[other_trained].tolist() == ids[trained].tolist()
  reply_ids, reply_trained = chat.encode_chat(
      tokenizer, _replace(CONVERSATION, 4, "It returns a length."))
  assert reply_ids[reply_trained].tolist() != ids[trained].tolist()


def test_packed_batches_weight_the_replies_only(tokenizer, tokenizer_file, tmp_path):
  """Batches from the loader: every weighted target is a reply token (or its
  EOS) of the conversation in that segment, and every reply token of a kept
  conversation is weighted once."""
  path = tmp_path / "chats.jsonl"
  rows = [{"messages": [{"role": "user", "content": f"x{i}?"},
                        {"role": "assistant", "content": f"y{i}."}]}
          for i in range(40)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = tiny_config("gpt", vocab_size=512)
  config.data.update(task="chat", text_column="messages", paths=str(path), seq_len=64,
                     tokenizer=tokenizer_file)
  config.train.update(batch_size=4, eval_steps=1)
  datasets = build_datasets(config, str(tmp_path / "work"), 0, 1)
  batch = next(datasets.train_iter)
  replies = {tuple(tokenizer.encode(r["messages"][1]["content"]) + [tokenizer.eos_id])
             for r in rows}
  segments_seen = 0
  for row in range(batch["inputs"].shape[0]):
    for segment in set(batch["segment_ids"][row].tolist()) - {0}:
      in_segment = batch["segment_ids"][row] == segment
      weighted = batch["targets"][row][in_segment & (batch["loss_mask"][row] > 0)]
      assert tuple(weighted.tolist()) in replies
      # Positions restart per conversation.
      assert batch["positions"][row][in_segment][0] == 0
      segments_seen += 1
  assert segments_seen > batch["inputs"].shape[0]  # Several conversations per row.


def test_conversations_that_all_lose_their_replies_are_one_error(tokenizer_file, tmp_path):
  """Every conversation cut before its reply: an error, not a trainer that
  waits forever for a batch."""
  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": f"A long question number {i} " * 8},
      {"role": "assistant", "content": "yes"}]}) + "\n" for i in range(12)))
  config = tiny_config("gpt", vocab_size=512)
  config.data.update(task="chat", text_column="messages", paths=str(path), seq_len=16,
                     tokenizer=tokenizer_file)
  with pytest.raises(UserError, match="keeps a reply token.*raise data.seq_len"):
    build_datasets(config, str(tmp_path / "work"), 0, 1)


def test_packed_conversations_never_see_each_other():
  """A packed row [A, B]: B's logits do not depend on A."""
  config = tiny_config("llama")
  model = build_model(config.model)
  tokens = jax.random.randint(jax.random.key(0), (1, 24), 3, 128)
  other = tokens.at[0, :10].set((tokens[0, :10] + 7) % 128)
  segment_ids = jnp.asarray([[1] * 10 + [2] * 14])
  positions = jnp.asarray([list(range(10)) + list(range(14))])
  params = init_params(model, tokens, seed=1)
  run = lambda t: apply(model, params, t, segment_ids_BxL=segment_ids,  # pylint: disable=unnecessary-lambda-assignment
                              positions_BxL=positions)
  np.testing.assert_allclose(run(tokens)[0, 10:], run(other)[0, 10:], atol=1e-6)
  assert float(jnp.abs(run(tokens)[0, :10] - run(other)[0, :10]).max()) > 1e-3


@pytest.mark.parametrize("line,fragment", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "empty assistant message"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "has role None"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},'
     ' {"role": "assistant", "content": "yo"}]}', "only the first may be"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
     "no text content"),
    ('{"other": 1}', "messages must be a non-empty list"),
    ("not json", "is not JSON"),
])
def test_malformed_conversations_name_their_line(tmp_path, line, fragment):
  path = tmp_path / "bad.jsonl"
  good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(UserError, match=fragment) as error:
    read_task_file(str(path), "messages", "target", "chat")
  assert f"{path}:2" in str(error.value) or "JSON" in str(error.value)


def test_long_conversations_are_cut_and_promptless_ones_dropped(tokenizer):
  encode = chat.EncodeChat(tokenizer, "text", seq_len=40)
  long_reply = {"text": json.dumps([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "word " * 40}])}
  [example] = encode.map(long_reply)["examples"]
  assert len(example["inputs"]) == 40 and example["weights"].sum() > 0
  long_prompt = {"text": json.dumps([{"role": "user", "content": "word " * 40},
                                     {"role": "assistant", "content": "yes"}])}
  assert encode.map(long_prompt)["examples"] == []


def test_sft_run_learns_the_replies_and_chats(tmp_path):
  """configs/sft.py on a few conversations: the eval loss (replies only)
  falls, and the run answers through generate --chat."""
  path = tmp_path / "chats.jsonl"
  rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a + b}"}]}
          for a in range(10) for b in range(10)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir = str(tmp_path / "sft")
  result = run_train("--config=configs/sft.py:tiny", f"--workdir={workdir}",
                     f"--config.data.paths={path}", "--config.data.vocab_size=300",
                     "--config.model.num_layers=2", "--config.model.embed_dim=64",
                     "--config.model.mlp_dim=128", "--config.model.vocab_size=512",
                     "--config.data.seq_len=64", "--config.model.max_len=64",
                     "--config.train.steps=40", "--config.train.eval_every=20",
                     "--config.train.batch_size=8", "--config.train.eval_steps=2",
                     "--config.train.progress=False")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 2 and evals[-1] < evals[0] - 0.5, evals
  from bigmodel import api  # pylint: disable=g-import-not-at-top
  generator = api.load_generator(workdir)
  reply = generator.chat("What is 2 plus 3?", max_new_tokens=6)
  assert isinstance(reply, str)


def test_chat_needs_a_decoder(tmp_path):
  path = tmp_path / "chats.jsonl"
  path.write_text('{"messages": [{"role": "user", "content": "a"}, '
                  '{"role": "assistant", "content": "b"}]}\n' * 4)
  result = run_train("--config=configs/t5.py:tiny", f"--workdir={tmp_path / 'w'}",
                     "--config.data.task=chat", "--config.data.text_column=messages",
                     f"--config.data.paths={path}")
  assert_user_error(result, "data.task=chat fine-tunes a decoder-only model")
