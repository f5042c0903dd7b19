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


class Interrupted(KeyboardInterrupt):
    """SIGINT arrived. A subclass, not KeyboardInterrupt itself: CPython remembers a bare KeyboardInterrupt
    that escapes any `exec` of source text (dataclasses and namedtuples are made that way during imports)
    and, even once sdcli has caught it and chosen exit 130, kills the process with SIGINT at exit, silently;
    it checks for the exact type, so this one is only ever what sdcli makes of it."""


def raise_interrupted(signum, frame) -> None:
    """The SIGINT handler (Python's own raises the bare KeyboardInterrupt)."""
    raise Interrupted()


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler: the signal becomes a Terminated exception where the program is."""
    raise Terminated()
