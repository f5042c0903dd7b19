"""The console entry point. Signals become exceptions and the standard streams learn to print any path
before anything heavier is imported, so Ctrl-C or SIGTERM at any moment ends with exit 130 or 143 and
no traceback, and a file name made of undecodable bytes never crashes a print."""

from __future__ import annotations

import codecs
import signal
import sys

from sdcli.errors import Terminated, raise_interrupted, raise_terminated

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def main() -> None:
    """`sdcli` and `python -m sdcli`."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores it
        signal.signal(signal.SIGINT, raise_interrupted)
    signal.signal(signal.SIGTERM, raise_terminated)
    codecs.register_error("sdcli-escape", _escape)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="sdcli-escape")
    try:
        from sdcli.cli import app

        app(prog_name="sdcli")
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    except Terminated:
        sys.exit(EXIT_SIGTERM)


def _escape(error: UnicodeError):
    """Undecodable bytes that arrived as surrogates (argv, file names) go out as those same bytes, so a
    printed path names the real file; any other character the stream's encoding lacks is escaped."""
    if isinstance(error, UnicodeEncodeError):
        chunk = error.object[error.start : error.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in chunk):
            return bytes(ord(c) - 0xDC00 for c in chunk), error.end
    return codecs.backslashreplace_errors(error)
