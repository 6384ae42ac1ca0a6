"""Typed errors. Each carries a message saying what is wrong and a hint saying how to fix it.

The CLI turns them into one-line messages; library users catch SklookupError.
"""

from __future__ import annotations


class SklookupError(Exception):
    """Base class: `message` says what is wrong, `hint` how to fix it (may be empty)."""

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


class NotLoaded(SklookupError):
    """No dispatcher is loaded in the target network namespace."""


class EnvironmentProblem(SklookupError):
    """Something about the machine: bpffs, BCC, the kernel, stale or foreign state."""


class CompileError(SklookupError):
    """The BPF program did not compile or did not pass the verifier; `log` holds the output."""

    def __init__(self, message: str, log: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.log = log
