"""Typed errors: library code raises these; only the CLI turns them into a stderr line and an exit code."""


class SdcliError(Exception):
    """Base of every error that is the user's to fix (bad input, missing files) rather than a bug."""


class ConfigError(SdcliError):
    """A model config is missing, malformed or names an unknown key or value."""


class CheckpointError(SdcliError):
    """A weights file is missing, unreadable, truncated, or does not fit the config."""


class RequestError(SdcliError):
    """A generation request has a bad value (size, steps, sampler, ...)."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C (KeyboardInterrupt), discarding the image in flight."""


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler: the signal becomes a Terminated exception where the program is."""
    raise Terminated()
