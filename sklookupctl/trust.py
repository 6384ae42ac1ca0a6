"""What sklookupctl trusts on disk, and the lock.

Root acts on what it finds in two places another user could reach: the state directory in
bpffs (whose root is mode 1777, like /tmp) and the compiled-program cache. Neither is used
unless nobody but its owner could have made or changed it:

- the state directory `<bpffs>/sklookupctl` is a real directory (not a symlink), owned by root,
  mode 0700 (so nobody else can open it, let alone take its lock), in a bpffs whose root
  others cannot rename things in (sticky, or not writable by them);
- a cache directory, and every directory above it, is owned by the effective user or root and
  not writable by anyone else (unless sticky and root's, like /tmp); a cache file is a regular
  file owned by the effective user and writable by nobody else.

Everything is checked on open file descriptors, so a path swapped after the check is not
followed.

The lock is a flock on the state directory: exclusive for writers, shared for readers, and
nobody waits for it longer than they were told to (Busy names the holder's pid and command).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator

from .errors import Busy, EnvironmentProblem, Untrusted, denied

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def open_state_dir(bpffs: str, path: str, create: bool) -> int | None:
    """Open `path` (directly under the bpffs mount `bpffs`) as a state directory: made 0700 by
    root when `create`, refused (Untrusted, one line saying what to check) when someone else
    could have made or changed it. None when it does not exist and `create` is False."""
    top = os.stat(bpffs)
    if top.st_uid != 0:
        raise Untrusted(
            f"{bpffs} is owned by uid {top.st_uid}, not root: they could rename {path} away "
            "and hide what steers",
            f"use a bpffs mount of root's (chown root {bpffs}, or the default /sys/fs/bpf)",
        )
    if (top.st_mode & stat.S_IWOTH or top.st_mode & stat.S_IWGRP) and not (
        top.st_mode & stat.S_ISVTX
    ):
        raise Untrusted(
            f"{bpffs} is writable by other users without the sticky bit ({_mode(top)}): they "
            f"could replace {path}",
            f"chmod 1777 {bpffs} (the default of a bpffs mount), or o-w",
        )
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except PermissionError:
            raise denied(f"cannot create {path}") from None
        except OSError as e:
            raise EnvironmentProblem(
                f"cannot create {path}: {e.strerror}", f"{bpffs} must be a bpffs mounted read-write"
            ) from None
    try:
        fd = os.open(path, O_DIR)
    except FileNotFoundError:
        if create:
            raise EnvironmentProblem(f"{path} vanished while it was made", "run again") from None
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symlink" if os.path.islink(path) else "not a directory"
            raise Untrusted(
                f"{path} is {what}: sklookupctl did not make it",
                f"check who made it and remove it (rm {path}); sklookupctl makes a directory",
            ) from None
        if e.errno == errno.EACCES:
            raise denied(f"cannot open {path}") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != 0:
            raise Untrusted(
                f"{path} is owned by uid {st.st_uid}, not root: another user made it, and "
                "anything in it may be theirs",
                f"check what it holds, remove it (rm -r {path}) and run again",
            )
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise Untrusted(
                f"{path} is mode {_mode(st)}: other users could change it",
                f"check what it holds; chmod 0700 {path} if it is all sklookupctl's",
            )
        if stat.S_IMODE(st.st_mode) & 0o077 and create:
            # made by an older version (0755): others could open it and take the lock
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_entry(path: str) -> bool:
    """Whether `path`, inside the state directory, is a directory root made (not a symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0


# -- the lock ---------------------------------------------------------------------------------


def lock_holders(st: os.stat_result) -> list[int]:
    """Pids holding a lock on the file `st` describes (from /proc/locks; a flock shows the pid
    that took it). Empty when none can be found."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:  # a waiter, not a holder
                continue
            if len(parts) >= 6 and parts[5] == key and parts[4].isdigit():
                pids.append(int(parts[4]))
    return pids


def describe_pid(pid: int) -> str:
    """`pid N (command line)` for a message, and its uid when not root; the text is the
    process's own, escaped at output."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        uid = 0
    owner = f", uid {uid}" if uid else ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
        cmd = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        if not cmd:
            with open(f"/proc/{pid}/comm", "rb") as f:
                cmd = f.read(64).decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    return f"pid {pid} ({cmd}{owner})"


LOCK = "lock"  # <state dir>/lock: the directory that is flocked


def _private_dir(parent_fd: int, name: str, shown: str) -> int | None:
    """`name` in the directory `parent_fd`, made 0700 if missing, opened; refused unless root's
    and closed to others. None on a read-only bpffs where it was never made."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise Untrusted(
            f"{shown} is owned by uid {st.st_uid} with mode {_mode(st)}",
            f"check who made it; rmdir {shown} and run again",
        )
    return fd


def open_lock(base_fd: int, base: str) -> int:
    """The directory to flock: `lock` inside the state directory, made 0700 if missing. A
    process that opened the state directory while an older version left it 0755 may hold a
    flock on it for ever; it cannot reach this one. On a read-only bpffs where it was never
    made (then nobody can write either), the state directory itself."""
    fd = _private_dir(base_fd, LOCK, f"{base}/{LOCK}")
    return base_fd if fd is None else fd


TURN = "turn"  # <state dir>/lock/turn: the turnstile that lets a waiting writer in


def open_turn(lock_fd: int, base: str) -> int | None:
    """The turnstile: `turn` inside the lock directory, made 0700 if missing (None on a
    read-only bpffs where it was never made: nobody can write there, so no writer waits)."""
    return _private_dir(lock_fd, TURN, f"{base}/{LOCK}/{TURN}")


@contextlib.contextmanager
def locked_fairly(
    fd: int, turn: int | None, path: str, exclusive: bool, wait: float
) -> Iterator[None]:
    """`locked`, through a turnstile: everyone passes `turn` (writers exclusively, readers
    shared) on the way to the lock and leaves it once in. flock prefers nobody, so without it
    readers that overlap one another (metrics scraped back to back) would keep a writer out
    for ever; with it, a waiting writer holds the turnstile and new readers queue behind it."""
    if turn is None:
        with locked(fd, path, exclusive, wait):
            yield
        return
    deadline = time.monotonic() + wait
    inner = None
    # waiting at the turnstile means waiting for whoever holds the lock (a writer queued
    # ahead holds the turnstile): the error names the lock's holders, and the one ahead
    with locked(turn, path, exclusive, wait, holders_of=fd):
        inner = locked(fd, path, exclusive, max(0.0, deadline - time.monotonic()), wait)
        inner.__enter__()
    try:
        yield
    finally:
        inner.__exit__(None, None, None)


POLL = 0.02  # s between tries at first; doubles up to MAX_POLL
MAX_POLL = 0.25


@contextlib.contextmanager
def locked(
    fd: int,
    path: str,
    exclusive: bool,
    wait: float,
    asked: float | None = None,
    holders_of: int | None = None,
) -> Iterator[None]:
    """Hold a flock on `fd` for the block, waiting at most `wait` seconds for it (of the
    `asked` in all, which the error says). `holders_of`: `fd` is the turnstile of that lock,
    whose holders the error names first."""
    how = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + wait
    pause = POLL
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            me = os.getpid()
            main = os.fstat(fd if holders_of is None else holders_of)
            holders = list(dict.fromkeys(p for p in lock_holders(main) if p != me))
            who = ", ".join(describe_pid(p) for p in holders) or "another command"
            ahead = []
            if holders_of is not None:
                queued = dict.fromkeys(p for p in lock_holders(os.fstat(fd)) if p != me)
                ahead = [p for p in queued if p not in holders]
            queue = (
                f", and {', '.join(describe_pid(p) for p in ahead)} waits for it ahead of this "
                "command"
                if ahead
                else ""
            )
            raise Busy(
                f"{path} is locked by {who}{queue}; waited {wait if asked is None else asked:g} s",
                "let it finish and run again, or wait longer with --wait SECONDS",
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, MAX_POLL)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)


# -- the program cache ------------------------------------------------------------------------


def cache_problem(path: str) -> str | None:
    """Why the directory `path` cannot be trusted as a cache (None when it can): it and every
    directory above it must be owned by the effective user or root, and not writable by anyone
    else (a sticky directory of root's, like /tmp, is fine above it)."""
    euid = os.geteuid()
    real = os.path.realpath(path)
    parts = real.split("/")[1:]
    cur = "/"
    for i in range(len(parts) + 1):
        if i:
            cur = os.path.join(cur, parts[i - 1])
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return None if i else f"{cur} is missing"  # made later, by us
        except OSError as e:
            return f"{cur}: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{cur} is not a directory"
        last = i == len(parts)
        if st.st_uid not in (euid, 0) or (last and st.st_uid != euid):
            return f"{cur} is owned by uid {st.st_uid}"
        writable = stat.S_IMODE(st.st_mode) & 0o022
        if writable and not (not last and st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return f"{cur} is writable by others ({_mode(st)})"
    return None


def open_cache_file(path: str) -> int | None:
    """A cache file opened for reading if it is a regular file owned by the effective user and
    writable by nobody else; None otherwise (or when it is missing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if (
        not stat.S_ISREG(st.st_mode)
        or st.st_uid != os.geteuid()
        or stat.S_IMODE(st.st_mode) & 0o022
    ):
        os.close(fd)
        return None
    return fd
