"""Knowledge distillation into a smaller model: ``--config=configs/distill.py:PRESET``.

``PRESET`` is ``ARCH:PRESET`` of any config file (``gpt:tiny``, ``llama:llama3_8b``,
``bert:tiny``, ``t5:tiny``; a bare name is a GPT preset, default ``tiny``): the
student's family and training settings. ``tiny`` makes the student half its
tiny preset's depth and width (the tiny GPT's: 2 layers, width 128). Give the teacher with
``--config.distill.teacher=WORKDIR`` (a run of the same family and vocabulary,
e.g. one of ``configs/gpt.py:tiny``) and its tokenizer with
``--config.data.tokenizer``; without a teacher the same config trains the
student alone, the baseline to compare with (docs/compression.md).
"""
import importlib


def get_config(preset: str = "tiny"):
  arch, _, name = (preset or "tiny").rpartition(":")
  c = importlib.import_module(f"configs.{arch or 'gpt'}").get_config(name)
  if name == "tiny":  # Half the tiny preset's depth (T5's decoder's too) and width.
    c.model.update(num_layers=max(1, c.model.num_layers // 2), embed_dim=c.model.embed_dim // 2,
                   mlp_dim=c.model.mlp_dim // 2)
    if c.model.get("num_decoder_layers", 0) > 0:
      c.model.num_decoder_layers = max(1, c.model.num_decoder_layers // 2)
  c.distill.update(alpha=0.5, temperature=2.0)
  return c
