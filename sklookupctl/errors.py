"""Typed errors. Each carries a message saying what is wrong and a hint saying how to fix it.

The CLI turns them into one-line messages and exit codes; library users catch SklookupError.
Every class carries its exit code (`exit_code`):

    0  success
    1  bad input, or a request refused (conflicting rule, socket not found, nothing loaded)
    2  usage: unknown option, missing argument (click's own)
    3  needs privileges (run as root)
    4  state or machine problem: busy lock, untrusted or foreign state, bpffs, BCC, kernel
    5  `apply --exit-code` only: something changed (with --dry-run: would change)
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_PRIVILEGES = 3
EXIT_STATE = 4
EXIT_DIFFERS = 5  # apply --exit-code: something changed, or would
EXIT_INTERRUPTED = 130  # Ctrl-C before anything changed (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM before anything changed (128 + SIGTERM)
EXIT_INTERNAL = 70  # a bug: the traceback is printed (EX_SOFTWARE)


class SklookupError(Exception):
    """Base class: `message` says what is wrong, `hint` how to fix it (may be empty)."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidArgument(SklookupError):
    """Malformed user input: protocol, prefix, ports, address, name."""


class RuleConflict(SklookupError):
    """A rule that would be ambiguous or would silently change another."""


class NotFound(SklookupError):
    """A netns, rule, socket, process or fd that does not exist."""


class SocketRejected(SklookupError):
    """A socket that exists but cannot serve the rule (state, protocol, family, netns)."""


class TargetMismatch(SocketRejected):
    """A target's socket cannot serve a rule that uses it (IP family); names both."""

    def __init__(self, message: str, hint: str, target: str, rule: object) -> None:
        super().__init__(message, hint)
        self.target = target
        self.rule = rule  # the RuleKey of the first rule it cannot serve


class PermissionDenied(SklookupError):
    """The caller lacks the privileges the operation needs."""

    exit_code = EXIT_PRIVILEGES


class NotLoaded(SklookupError):
    """No dispatcher is loaded in the target network namespace."""


class EnvironmentProblem(SklookupError):
    """Something about the machine: bpffs, BCC, the kernel, stale or foreign state."""

    exit_code = EXIT_STATE


class Busy(EnvironmentProblem):
    """Another command holds the lock longer than the caller would wait."""


class Untrusted(EnvironmentProblem):
    """State or a directory that someone other than root could have made or changed."""


class OutputFailed(EnvironmentProblem):
    """The command's output could not be written (a full disk, an I/O error); a reader that
    went away is not this (the output ends, the command goes on)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, as the CLI turns it into an exception before anything has changed (after the
    switch it is held: see interrupts.py)."""


class CompileError(SklookupError):
    """The BPF program did not compile or did not pass the verifier; `log` holds the output."""

    exit_code = EXIT_STATE

    def __init__(self, message: str, log: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.log = log


ROOT_REFUSED = (
    "refused even to root: a security module (AppArmor, SELinux, Yama's ptrace_scope), kernel "
    "lockdown or a read-only mount forbids it"
)


def denied(message: str, need: str = "") -> SklookupError:
    """An operation the kernel refused: for anyone but root, PermissionDenied saying to run as
    root (`need`: what for); for root, who has every privilege already, what else refuses it."""
    if os.geteuid() != 0:
        return PermissionDenied(message, "run as root" + (f" ({need})" if need else ""))
    return EnvironmentProblem(message, ROOT_REFUSED)
