"""The one validation layer for what people and other processes hand sklookupctl.

Every input from outside (arguments, rule files, environment) passes one of these before it is
used: names, numbers, address text, the netns argument, the rule file itself. Each says in one
line what is wrong (InvalidArgument, exit code 1). Pure Python except `netns_file` and
`read_text`, which look at a path without ever blocking on it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import math
import os
import re
import stat
from typing import Any

from .errors import InvalidArgument, NotFound, PermissionDenied, SklookupError, denied

# target names: printable ASCII only, so a name is the same on a terminal, in JSON and in a
# rule file; `fullmatch`, since `$` would let a final newline through
TARGET_NAME = re.compile(r"[A-Za-z0-9._:@\[\]/][A-Za-z0-9._:@\[\]/-]{0,62}")
TARGET_NAME_HINT = "use 1-63 letters, digits and . _ : @ [ ] / -, not starting with -"
# named network namespaces: a file name under /run/netns, as `ip netns` takes it
NETNS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@:+-]{0,62}")
NETNS_NAME_HINT = "use 1-63 letters, digits and . _ @ : + -, not starting with . or -"

PID_MAX = 1 << 22  # PID_MAX_LIMIT on 64-bit kernels: no pid is larger
FD_MAX = (1 << 31) - 1
WAIT_MAX = 3600.0
# bytes: a million rules as `export` writes them fit (about 80 bytes each; 160 with IPv6
# prefixes and 63-character target names); the file is read whole, so this bounds that memory
RULE_FILE_MAX = 256 << 20
TOML_DEPTH_MAX = 8  # [targets.NAME] and [[rules]] need 3; anything deeper is not a rule file


def show(text: str, limit: int = 80) -> str:
    """User text inside an error message: quoted, escaped (repr), and cut to `limit`."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def label(text: str) -> str:
    """A key from a file inside a message: as it is when it could be a name, else show()."""
    return text if TARGET_NAME.fullmatch(text) else show(text)


def target_name(name: object) -> str:
    if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise InvalidArgument(
            f"target name {show(str(name))} is not valid",
            TARGET_NAME_HINT,
        )
    return name


def netns_name(name: str) -> str:
    if not NETNS_NAME.fullmatch(name):
        raise InvalidArgument(f"netns name {show(name)} is not valid", NETNS_NAME_HINT)
    return name


def digits(text: str, what: str, max_len: int) -> int:
    """A number written in ASCII digits (not ² or ٨٠, which Python's int() takes), at most
    `max_len` of them: no number of a thousand digits is ever converted."""
    t = text.strip()
    if not t or not t.isascii() or not t.isdigit() or len(t) > max_len:
        raise InvalidArgument(f"{what} {show(text, 40)} is not a number")
    return int(t)


def pid(value: Any, what: str = "pid") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PID_MAX:
        raise InvalidArgument(
            f"{what} {show(str(value), 40)} is not a process id", f"pids are 1-{PID_MAX}"
        )
    return value


def fd(value: Any, what: str = "fd") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= FD_MAX:
        raise InvalidArgument(
            f"{what} {show(str(value), 40)} is not a file descriptor", f"fds are 0-{FD_MAX}"
        )
    return value


def seconds(text: str) -> float:
    """A time to wait: 0-3600, decimal digits and one point (no nan, inf or exponent)."""
    t = text.strip()
    body = t.replace(".", "", 1)
    if not body or not body.isascii() or not body.isdigit() or len(t) > 12:
        raise InvalidArgument(f"{show(text, 40)} is not a number of seconds", "such as 5 or 0.5")
    v = float(t)
    if not math.isfinite(v) or v > WAIT_MAX:
        raise InvalidArgument(f"{t} seconds is too long", f"wait at most {WAIT_MAX:.0f} seconds")
    return v


def address_text(text: str, what: str, hint: str) -> str:
    """Address or prefix text before it is parsed: ASCII, no scope id."""
    t = text.strip()
    if not t.isascii() or not t.isprintable():
        raise InvalidArgument(f"{show(text)} is not an IP {what}", hint)
    if "%" in t:
        raise InvalidArgument(
            f"{show(text)} has a scope id",
            "sk_lookup matches addresses, not interfaces: give the address without %SCOPE",
        )
    return t


MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def not_mapped(net: ipaddress.IPv4Network | ipaddress.IPv6Network, text: str) -> None:
    """IPv4-mapped IPv6 never reaches sk_lookup: IPv4 packets are looked up as IPv4. (A wider
    IPv6 prefix that contains the mapped range is fine: it means its other addresses.)"""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(MAPPED):
        v4 = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        raise InvalidArgument(
            f"{text} is an IPv4-mapped IPv6 prefix, which no packet ever has",
            f"write the IPv4 prefix: {v4.network_address if v4.prefixlen == 32 else v4}",
        )


def toml_depth(value: Any, limit: int = TOML_DEPTH_MAX) -> int:
    """How deeply `value` nests (iteratively: a deep value never exhausts the stack)."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
    return deepest


# -- paths -------------------------------------------------------------------------------------

NETNS_HINT = "give a name under /run/netns or a path such as /proc/PID/ns/net"


def path_text(path: str, what: str) -> str:
    """A path from outside: no NUL (the system would cut it there, or Python refuse it)."""
    if not path or "\0" in path:
        raise InvalidArgument(f"{what} {show(path)} is not a path")
    return path


def netns_file(path: str, spec: str) -> int:
    """Open a path that should be a network namespace file without ever blocking on it (a FIFO,
    a device): it must be a regular file (nsfs files are) and is opened non-blocking. Returns
    the fd; the caller checks the namespace type."""
    path_text(path, "netns")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(
            f"network namespace {show(spec)} does not exist",
            f"see `sklookupctl netns list`, or create it with `sklookupctl netns add {spec}`"
            if NETNS_NAME.fullmatch(spec)
            else "see `sklookupctl netns list`"
            if "/" not in spec
            else NETNS_HINT,
        ) from None
    except OSError as e:
        raise _not_netns(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{show(path)} is not a network namespace", NETNS_HINT)
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise _not_netns(path, e) from None


def _not_netns(path: str, e: OSError) -> SklookupError:
    if isinstance(e, PermissionError):
        return denied(f"cannot open network namespace {show(path)}")
    why = "" if isinstance(e, NotADirectoryError) else f" ({e.strerror})"
    return InvalidArgument(f"{show(path)} is not a network namespace{why}", NETNS_HINT)


# file systems whose files are the kernel's, where a read may block or have effects
# (/proc/kmsg): proc, sysfs, debugfs, tracefs, securityfs, configfs, bpffs, cgroup, cgroup2
PSEUDO_FS = {
    0x9FA0,
    0x62656572,
    0x64626720,
    0x74726163,
    0x73636673,
    0x62656570,
    0xCAFE4A11,
    0x27E0EB,
    0x63677270,
}


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def _fs_type(fd: int) -> int:
    buf = _Statfs()
    if ctypes.CDLL(None, use_errno=True).fstatfs(fd, ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


PIPE_WAIT = 60.0  # seconds `apply` waits for a FIFO's writer to come and write


def _writer_came(fd: int, wait: float) -> bool:
    """Whether a FIFO opened non-blocking gets data or a writer that closed, within `wait`
    seconds. (Read at once, a FIFO without a writer yet looks empty: `apply` would remove
    every rule; opened blocking, it would hang forever.)"""
    import select

    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(wait * 1000)))


def read_text(path: str, stdin: Any = None, limit: int = RULE_FILE_MAX) -> str:
    """A rule file's text: a regular file or a pipe (`-` is stdin, `<(...)` a pipe), at most
    `limit` bytes, UTF-8. Devices and directories are refused without reading them."""
    hint = "give a TOML rule file (- for stdin)"
    path_text(path, "rule file")
    if path == "-":
        f = stdin.buffer if hasattr(stdin, "buffer") else stdin
        try:
            if f is None or f.closed:
                raise OSError(errno.EBADF, "closed")
            data = f.read(limit + 1)
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise InvalidArgument(f"cannot read the rule file from stdin: {why}", hint) from None
        if isinstance(data, str):
            data = data.encode()
    else:
        try:
            fd_ = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{show(path)}: no such file") from None
        except PermissionError:
            raise PermissionDenied(f"cannot read {show(path)}", "check its permissions") from None
        except OSError as e:
            raise InvalidArgument(f"cannot read {show(path)}: {e.strerror}", hint) from None
        mode = os.fstat(fd_).st_mode
        pseudo = stat.S_ISREG(mode) and _fs_type(fd_) in PSEUDO_FS
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)) or pseudo:
            os.close(fd_)
            what = (
                "a directory"
                if stat.S_ISDIR(mode)
                else "a kernel file, not a rule file"
                if pseudo
                else "not a file or a pipe"
            )
            raise InvalidArgument(f"{show(path)} is {what}", hint)
        with os.fdopen(fd_, "rb") as f:
            if stat.S_ISFIFO(mode) and not _writer_came(fd_, PIPE_WAIT):
                raise InvalidArgument(
                    f"nothing was written to {show(path)} within {PIPE_WAIT:.0f} s",
                    "start the program that writes the rule file first",
                )
            os.set_blocking(fd_, True)  # a pipe's writer may be slow: wait for it
            try:
                data = f.read(limit + 1)
            except OSError as e:
                raise InvalidArgument(f"cannot read {show(path)}: {e.strerror}", hint) from None
    if len(data) > limit:
        raise InvalidArgument(
            f"{show(path)} is larger than {limit >> 20} MiB", "a rule file is at most that"
        )
    if not bytes(data).strip():
        # a generator that died, a pipe closed early: applying it would remove every rule
        raise InvalidArgument(
            f"{show(path)} is empty: applying it would remove every rule",
            "to remove every rule on purpose, apply a file that holds only a comment, or use "
            "`detach --all`",
        )
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(
            f"{show(path)}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
