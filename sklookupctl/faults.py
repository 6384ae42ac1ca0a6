"""Named fault points in the write path, for crash tests. Inert unless an environment variable
names them: nothing here runs in normal use but one dictionary lookup.

    SKLOOKUPCTL_FAULT=NAME[:N[:HOW]]  the Nth time (default 1st) this process reaches point
                                      NAME: HOW is KILL (SIGKILL, the default), INT or TERM
                                      (that signal), or RAISE (an OSError, as a failing
                                      syscall would)
    SKLOOKUPCTL_FAULT_TRACE=FILE      append the name of every point reached to FILE

A test first runs a command with the trace to learn the points it passes, then runs it again
once per point, killed there, and checks that steering follows the old or the new rule set and
that the next command recovers. The points are listed in POINTS, in the order a change meets them.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = (
    "commit.built",  # a generation's maps filled and its program loaded, nothing pinned
    "commit.pinned",  # the new generation pinned beside the live one
    "commit.filled",  # new sockets put in their slots
    "commit.linked",  # a new link made (first generation, or re-attach), not pinned yet
    "commit.relinked",  # re-attach: the new link pinned as link-next, not yet renamed
    "commit.switched",  # the new generation is live (link updated, or made and pinned)
    "retire.carried",  # counters carried into the live generation
    "retire.freed",  # slots of the old generation emptied
    "retire.unpinned",  # the old generation's directory removed
    "remove.unlinked",  # detach --all: the link's pin removed, link still attached
    "remove.detached",  # detach --all: link detached, pins not yet removed
    "unpin.partial",  # a directory half removed
    "note.pinned",  # apply found the file's rules live: its note pinned, not renamed in place
    "report.write",  # the command's output is being written
    "trace.pinned",  # trace: the traced copy and its trace directory pinned, not swapped in
    "trace.swapped",  # trace: the link runs the traced copy, the trace not yet under way
    "trace.stopping",  # trace: about to swap the plain program back (signals held)
)

_SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
_TRACE = os.environ.get("SKLOOKUPCTL_FAULT_TRACE", "")
_FAULT = ""
_name, _target, _how = "", 1, ""
_seen: dict[str, int] = {}


def arm(spec: str) -> None:
    """Set the fault as SKLOOKUPCTL_FAULT does (NAME[:N[:HOW]]; "" disarms): for tests that
    call the library in-process."""
    global _FAULT, _name, _target, _how
    name, _, rest = spec.partition(":")
    nth, _, how = rest.partition(":")
    if name and name not in POINTS:
        raise ValueError(f"no fault point {name!r}")
    if how and how not in (*_SIGNALS, "RAISE"):
        raise ValueError(f"{how!r} is not KILL, INT, TERM or RAISE")
    _FAULT, _name, _target, _how = spec, name, int(nth) if nth.isdigit() else 1, how
    _seen.clear()


arm(os.environ.get("SKLOOKUPCTL_FAULT", ""))


def point(name: str) -> None:
    """A place where a kill must leave recoverable state."""
    if not (_FAULT or _TRACE):
        return
    assert name in POINTS, name
    if _TRACE:
        with open(_TRACE, "a") as f:
            f.write(name + "\n")
    if name == _name:
        _seen[name] = _seen.get(name, 0) + 1
        if _seen[name] == _target:
            if _how == "RAISE":
                raise OSError(errno.EIO, f"fault injected at {name}")
            os.kill(os.getpid(), _SIGNALS[_how or "KILL"])
