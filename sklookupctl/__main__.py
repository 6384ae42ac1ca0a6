"""`python -I -m sklookupctl`: what the installed `sklookupctl` command runs (see scripts/setup:
-I, so that no PYTHON* variable a `sudo -E` kept decides what root's Python loads)."""

import signal
import sys

# Ctrl-C or SIGTERM while the modules load (a tenth of a second) ends the command as it would
# later, with one line and 130 or 143, not a traceback; cli.main installs its own handlers


def _terminated(*_: object) -> None:
    sys.stderr.write("error: terminated: nothing was changed\n")
    sys.exit(143)


signal.signal(signal.SIGTERM, _terminated)
try:
    from sklookupctl.cli import main
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted: nothing was changed\n")
    sys.exit(130)


def _exit(code: object) -> None:
    """End the process as sys.exit(code) would, without tearing the interpreter down: the
    command is done, its output is flushed and atexit handlers run, and freeing every object
    of a large rule set one by one would only delay the exit (50-80 ms at 100k rules)."""
    import atexit
    import contextlib
    import os

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away, or a stream closed (None: closed when the command started)
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(status & 0xFF)


try:
    main()
except SystemExit as e:
    _exit(e.code)
_exit(0)
