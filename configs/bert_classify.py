"""BERT sequence classification: ``--config=configs/bert_classify.py:PRESET``.

Fine-tune a pretrained encoder with ``--config.init_from=PRETRAINED_WORKDIR``
(the pooler and classifier start fresh; the run says so) and point
``--config.data.tokenizer`` at the pretraining run's ``tokenizer.model``. With
``data.paths=""`` the task is the default local one: which top-level standard
library package a code snippet comes from. Your own data: a CSV/JSONL file or
directory with ``text`` and ``label`` columns (see README).
"""
import configs.bert as bert

PRESETS = bert.PRESETS
_NUM_CLASSES = 8  # The default local task's packages; set to your label count.


def get_config(preset: str = "tiny"):
  c = bert.get_config(preset)
  c.model.update(num_classes=_NUM_CLASSES, dropout_rate=0.1)
  c.data.task = "classify"
  c.optim.update(learning_rate=1e-4 if preset != "tiny" else 5e-4, warmup_steps=30,
                 schedule="linear", end_lr_fraction=0.0, weight_decay=0.01)
  c.train.update(steps=300 if preset == "tiny" else 3000, batch_size=32, log_every=25,
                 eval_every=100, eval_steps=0)
  return c
