"""Text generation with key/value caches (see docs/generation.md).

- ``models``: each family's prefill and one-token step over a ``DecodeState``.
- ``sampling``: next-token choice: greedy, temperature, top-k, top-p.
- ``search``: the compiled decoding loops: sampling and beam search.
- ``reference``: full-forward re-decoding, the test oracle and benchmark baseline.

``bigmodel.generate`` puts a tokenizer and a workdir in front of these.
"""
