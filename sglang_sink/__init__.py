"""streaming-sink for SGLang.

SGLang loads this adapter through its ``sglang.srt.plugins`` entry point
(pyproject.toml), in every SGLang process, so ``--kv-policy streaming-sink``
works on the stock launcher and ``sglang.Engine(..., kv_policy="streaming-sink")``
needs no import. Every touch of SGLang internals is in ``hooks.py``.
"""
