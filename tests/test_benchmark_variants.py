"""benchmarks/variants.py: variants of the trainer's step, compiled side by side."""
import pytest

from benchmarks import variants
from bigmodel.errors import UserError
from model_fixtures import tiny_config


def test_variant_settings_are_config_keys_and_xla_options():
  base = tiny_config("gpt")
  name, config, options = variants.parse_variant(
      "unrolled:model.scan=False, train.batch_size=4,xla.some_option=True", base)
  assert name == "unrolled"
  assert config.model.scan is False and config.train.batch_size == 4
  assert base.model.scan is True and base.train.batch_size != 4  # The base is not touched.
  assert options == {"some_option": True}
  assert variants.parse_variant("baseline:", base)[2] == {}
  for bad, message in [("no-colon", "expected NAME:"), (":model.scan=False", "expected NAME:"),
                       ("x:model.scan", "is not key=value"), ("x:model.nope=1", "unknown config"),
                       ("x:train.batch_size='many'", "train.batch_size")]:
    with pytest.raises(UserError, match=message):
      variants.parse_variant(bad, base)


def test_variants_step_in_turns_from_the_same_state():
  base = tiny_config("gpt")
  base.train.batch_size = 2
  rows = variants.measure(
      [variants.parse_variant("default:", base),
       variants.parse_variant(
           "concurrency scheduler:xla.xla_cpu_enable_concurrency_optimized_scheduler=True", base)],
      rounds=2, compile_only=False)
  assert [r["name"] for r in rows] == ["default", "concurrency scheduler"]
  for row in rows:
    assert row["peak"] > 0 and row["planned"] > 0 and row["step_s"] > 0
  # A scheduling option reorders work, not arithmetic: the same losses.
  assert rows[0]["losses"] == pytest.approx(rows[1]["losses"], rel=1e-6)
  with pytest.raises(UserError, match="No such compile option"):
    variants.measure([variants.parse_variant("bad:xla.xla_cpu_no_such_option=1", base)],
                     rounds=1, compile_only=True)
