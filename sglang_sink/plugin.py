"""The ``sglang.srt.plugins`` entry point (pyproject.toml)."""


def register() -> None:
    """Runs once in each SGLang process (server/Engine, scheduler, detokenizer),
    before server args are built. With ``--kv-policy none`` every hook passes through."""
    from .hooks import install

    install()
