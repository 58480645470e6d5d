"""streaming-sink for vLLM.

vLLM loads this adapter through its ``vllm.general_plugins`` entry point, so
``--kv-policy streaming-sink`` works on the stock CLI with no import. The
offline ``LLM(...)`` binds its keywords before vLLM loads plugins, so import
this package first to use ``LLM(..., kv_policy="streaming-sink")``, or pass
``additional_config={"streaming_sink": {"kv_policy": "streaming-sink", ...}}``.
"""

from .hooks import install

install()
