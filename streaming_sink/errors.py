"""The one error type of the core: a setting an engine cannot serve."""


class PolicyConfigError(ValueError):
    """A streaming-sink setting the engine cannot serve; the message names the flag."""
