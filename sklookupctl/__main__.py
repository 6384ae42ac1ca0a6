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

main()
