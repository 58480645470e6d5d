"""Tooling around the streaming-sink core, not the contract itself: the offline demo
model and corpus (``prepare``: ``streaming-sink-prepare``) and a model's attention-sink
diagnosis (``diagnose``, ``cli``: ``streaming-sink diagnose MODEL``). Imports no engine."""
