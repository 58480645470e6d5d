"""The ``vllm.general_plugins`` entry point (pyproject.toml)."""


def register() -> None:
    """Runs once in every vLLM process before the CLI is parsed or a model loads.
    With ``--kv-policy none`` (the default) every hook passes straight through."""
    from .hooks import install

    install()
