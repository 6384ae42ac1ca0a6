"""`sklookupctl doctor`: what this machine and the state in bpffs lack, each with its fix.

Every check is a small function returning `Check` (ok, warn or fail, one line saying what was
found, and the fix). The judgments are pure functions of facts (`judge_*`), so they are
unit-tested without a kernel; the `check_*` functions gather the facts. A check never raises:
whatever goes wrong while it looks becomes its own `fail` with the reason (`_safely`).

doctor only reads. It makes no state directory, no lock, no cache directory or file, and
mounts nothing: where the commands' own helpers would make something (compiler.cache_dir makes
the cache directory, trust.open_lock the lock), it looks with read-only equivalents instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import api, compiler, store, trust
from .errors import (
    EXIT_OK,
    ROOT_REFUSED,
    EnvironmentProblem,
    PermissionDenied,
    SklookupError,
)

OK, WARN, FAIL = "ok", "warn", "fail"
LABELS = {OK: "ok", WARN: "warn", FAIL: "FAIL"}  # in the text report
NAME_WIDTH = 13
SK_LOOKUP_SINCE = (5, 9)
MEMCG_SINCE = (5, 11)  # BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK
MEMLOCK_LOW = 64 << 20
BTF = "/sys/kernel/btf/vmlinux"
# the smallest sk_lookup program: r0 = SK_PASS (1); exit
_INSN = struct.Struct("<BBhi")
PROBE = _INSN.pack(0xB7, 0, 0, 1) + _INSN.pack(0x95, 0, 0, 0)
PROBE_NAME = "skl_doctor"
COMPILER_FIX = (
    "apt-get install python3-bpfcc, and run sklookupctl from /usr/bin/python3 or a venv made "
    "with --system-site-packages (scripts/setup does both)"
)


@dataclass(frozen=True)
class Check:
    """One check's verdict: `detail` says what was found, `fix` what to do (empty when ok)."""

    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class Report:
    checks: list[Check]

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    @property
    def ok(self) -> bool:
        return not self.count(FAIL)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed (warnings are fine), else that of a machine problem (4)."""
        return EXIT_OK if self.ok else EnvironmentProblem.exit_code

    def summary(self) -> dict[str, int]:
        return {s: self.count(s) for s in (OK, WARN, FAIL)}

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "checks": [c.to_json() for c in self.checks],
            "summary": self.summary(),
        }

    def lines(self) -> list[str]:
        """The text report: one line per check, its fix below it, and a summary line."""
        out = []
        for c in self.checks:
            out.append(f"{LABELS[c.status]:<6}{c.name:<{NAME_WIDTH}} {c.detail}")
            if c.fix:
                out.append(f"  fix: {c.fix}")
        out.append(summary_line(self.count(WARN), self.count(FAIL)))
        return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(warnings: int, failures: int) -> str:
    return f"{_plural(warnings, 'warning')}, {_plural(failures, 'failure')}"


def _safely(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run one check; whatever it raises is its failure, never the report's."""
    try:
        got = fn()
    except Exception as e:
        reason = e.message if isinstance(e, SklookupError) else f"{type(e).__name__}: {e}"
        hint = e.hint if isinstance(e, SklookupError) else ""
        return [Check(name, FAIL, f"the check could not run: {reason}", hint)]
    return got if isinstance(got, list) else [got]


def checks(bpffs: str = api.DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT) -> list[Check]:
    """Every check, in the order they are reported."""
    privileged = has_privileges()
    out: list[Check] = []
    out += _safely("kernel", lambda: check_kernel(privileged))
    out += _safely("btf", check_btf)
    out += _safely("bpffs", lambda: check_bpffs(bpffs))
    out += _safely("privileges", check_privileges)
    out += _safely("compiler", check_compiler)
    out += _safely("cache", check_cache)
    out += _safely("memlock", check_memlock)
    out += _safely("netns", lambda: check_namespaces(bpffs, wait))
    return out


def run(bpffs: str = api.DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT) -> Report:
    return Report(checks(bpffs, wait))


# -- kernel ----------------------------------------------------------------------------------


def parse_release(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release such as 6.1.0-28-amd64; None when it has none."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def judge_kernel(release: str, load_error: OSError | None, privileged: bool) -> Check:
    """The release, and whether the kernel loaded a trivial sk_lookup program (`load_error`
    None: it did)."""
    version = parse_release(release)
    if version is not None and version < SK_LOOKUP_SINCE:
        return Check(
            "kernel",
            FAIL,
            f"{release}: older than 5.9, which brought BPF sk_lookup",
            "boot a kernel 5.9 or newer (Debian 12's 6.1 has sk_lookup)",
        )
    if load_error is None:
        return Check("kernel", OK, f"{release}: sk_lookup supported")
    why = load_error.strerror or str(load_error)
    if load_error.errno in (errno.EPERM, errno.EACCES) and not privileged:
        return Check(
            "kernel",
            WARN,
            f"{release}: sk_lookup support not tested: loading a program needs privileges ({why})",
            "run doctor as root",
        )
    if load_error.errno in (errno.EPERM, errno.EACCES):
        fix = f"the kernel refuses BPF even to root: {ROOT_REFUSED}"
    else:
        fix = "use a kernel with BPF sk_lookup (5.9+, CONFIG_BPF_SYSCALL=y, CONFIG_NET=y)"
    return Check("kernel", FAIL, f"{release}: the kernel refused an sk_lookup program: {why}", fix)


def probe_sk_lookup() -> OSError | None:
    """Load the trivial sk_lookup program and close it at once: None when the kernel took it.
    It is attached nowhere."""
    from .bpfsys import Program

    try:
        Program.load_sk_lookup(PROBE, PROBE_NAME).close()
    except OSError as e:
        return e
    return None


def check_kernel(privileged: bool) -> Check:
    return judge_kernel(os.uname().release, probe_sk_lookup(), privileged)


def check_btf(path: str = BTF) -> Check:
    if os.path.exists(path):
        return Check("btf", OK, f"{path} present")
    return Check(
        "btf",
        WARN,
        f"{path} missing: the kernel has no BTF (sklookupctl works without it; bpftool's "
        "program dumps and CO-RE tools need it)",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)",
    )


# -- bpffs and the state directory -----------------------------------------------------------


def mount_fix(bpffs: str, exists: bool = True) -> str:
    return (
        ("" if exists else f"mkdir -p {bpffs}; ")
        + f"mount -t bpf bpf {bpffs}; to mount it at every boot, add this line to /etc/fstab: "
        f"bpffs {bpffs} bpf defaults 0 0"
    )


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _quiet_is_bpffs(path: str) -> bool:
    from .bpfsys import is_bpffs

    try:
        return is_bpffs(path)
    except (OSError, ValueError):
        return False


def check_bpffs(bpffs: str) -> Check:
    """A bpffs mount point, and the trust checks every command applies to it and to the state
    directory in it (store.base_dir, trust.open_state_dir without creating anything)."""
    try:
        base = store.base_dir(bpffs)
    except SklookupError as e:
        # inside a bpffs (not its mount point), or not a path at all: the error's own hint
        if _quiet_is_bpffs(bpffs) or "\0" in bpffs or not bpffs:
            fix = e.hint
        else:
            fix = mount_fix(bpffs, os.path.exists(bpffs))
        return Check("bpffs", FAIL, e.message, fix)
    top = os.stat(bpffs)
    where = f"{bpffs} is a bpffs mount (mode {_mode(top)}, uid {top.st_uid})"
    try:
        fd = trust.open_state_dir(bpffs, base, create=False)
    except PermissionDenied as e:
        return Check(
            "bpffs",
            WARN,
            f"{where}; {base} not checked: {e.message} as uid {os.geteuid()}",
            "run doctor as root",
        )
    except SklookupError as e:
        return Check("bpffs", FAIL, f"{where}; {e.message}", e.hint)
    if os.statvfs(bpffs).f_flag & os.ST_RDONLY:
        if fd is not None:
            os.close(fd)
        return Check(
            "bpffs",
            WARN,
            f"{where}, mounted read-only: steering and every reading command work, but no "
            "change can be made (attach, apply, detach, register, trace fail)",
            f"mount -o remount,rw {bpffs}",
        )
    if fd is None:
        return Check("bpffs", OK, f"{where}; no state yet (the first attach makes {base})")
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_IMODE(st.st_mode) & 0o077:
        return Check(
            "bpffs",
            WARN,
            f"{where}; {base} is mode {_mode(st)} (made by an older version): other users "
            "can open it and take its lock (the next writing command makes it 0700)",
            f"chmod 0700 {base}",
        )
    problem = lock_problem(os.path.join(base, trust.LOCK))
    if problem:
        lock = os.path.join(base, trust.LOCK)
        return Check("bpffs", FAIL, f"{where}; {problem}", f"check who made it; rmdir {lock}")
    return Check("bpffs", OK, f"{where}; state in {base} (root's, {_mode(st)})")


def lock_problem(path: str) -> str:
    """What trust.open_lock would refuse in the lock directory, checked without making it
    ("" when it is fine or not there yet)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        return f"{path} is {kind} owned by uid {st.st_uid} with mode {_mode(st)}"
    return ""


# -- privileges ------------------------------------------------------------------------------


def has_privileges() -> bool:
    try:
        api.require_privileges()
    except Exception:
        return False
    return True


def check_privileges() -> Check:
    """The capabilities every command demands (api.require_privileges), and CAP_SYS_PTRACE,
    which taking other users' sockets (--to, --pid --fd) needs."""
    euid = os.geteuid()
    try:
        api.require_privileges()
    except PermissionDenied as e:
        return Check("privileges", FAIL, f"uid {euid}: {e.message}", e.hint)
    who = "root" if euid == 0 else f"uid {euid}"
    if not api._effective_caps() & (1 << api.CAP_SYS_PTRACE):
        return Check(
            "privileges",
            WARN,
            f"{who} with CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_BPF but not CAP_SYS_PTRACE: "
            "sockets of other users' processes cannot be taken (--to, --pid --fd)",
            "run sklookupctl as root (or with CAP_SYS_PTRACE too)",
        )
    return Check("privileges", OK, f"{who}: the capabilities every command needs")


# -- compiler and cache ----------------------------------------------------------------------


def cache_location(explicit: str, euid: int, home: str, xdg: str) -> tuple[str | None, str]:
    """Where compiler.cache_dir would keep compiled programs, and why it would not ("" when it
    would), found without making anything (cache_dir makes the directory). The same choice as
    compiler._cache_dir: --cache-dir, root's /var/cache/sklookupctl, XDG, HOME."""
    if "\0" in explicit + home + xdg:
        return None, "its path holds a NUL"
    if explicit:
        path = os.path.abspath(explicit)
    elif euid == 0:
        path = compiler.ROOT_CACHE
    elif os.path.isabs(xdg):
        path = os.path.join(xdg, "sklookupctl")
    elif os.path.isabs(home) and os.path.isdir(home):
        path = os.path.join(home, ".cache", "sklookupctl")
    else:
        return None, f"HOME ({home or 'unset'}) is not a directory"
    real = os.path.realpath(path)
    return real, trust.cache_problem(real) or ""


def _cache_here() -> tuple[str | None, str]:
    return cache_location(
        os.environ.get(compiler.CACHE_ENV) or "",
        os.geteuid(),
        os.environ.get("HOME", ""),
        os.environ.get("XDG_CACHE_HOME", ""),
    )


def judge_cache(path: str | None, problem: str, exists: bool) -> Check:
    if path is None or problem:
        where = f"{path} " if path else ""
        return Check(
            "cache",
            WARN,
            f"program cache {where}ignored ({problem}): every command that loads the "
            "dispatcher compiles it afresh (about 0.3 s, and BCC needed)",
            f"give a directory of your own with --cache-dir or {compiler.CACHE_ENV}",
        )
    if not exists:
        return Check("cache", OK, f"{path} trusted (not made yet: the first compile makes it)")
    return Check("cache", OK, f"{path} trusted")


def check_cache() -> Check:
    path, problem = _cache_here()
    return judge_cache(path, problem, path is not None and os.path.isdir(path))


def cached_image() -> str | None:
    """The cached program image of this version (program._read_cache: checksum and map
    references checked) for this kernel and BCC; its path, or None. Reads only."""
    from . import program

    path, problem = _cache_here()
    if path is None or problem:
        return None
    image = os.path.join(path, f"dispatcher-{program.cache_key(compiler.read_source())}.img")
    return image if program._read_cache(image) is not None else None


def bcc_problem() -> str:
    """Why `import bcc` fails ("" when it works)."""
    try:
        import bcc  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def judge_compiler(bcc_error: str, image: str | None, cache_usable: bool = True) -> Check:
    if not bcc_error and image:
        return Check("compiler", OK, f"BCC importable; cached program image {image}")
    if not bcc_error:
        return Check(
            "compiler",
            WARN,
            "BCC importable, but no cached program image for this version, kernel and BCC: "
            "the first command that loads the dispatcher compiles it (about 0.3 s), and until "
            "then `status` cannot tell whether running dispatchers are this version's",
            "nothing to install: the next attach or apply caches it"
            if cache_usable
            else "see the cache check: without a trusted cache every load compiles afresh",
        )
    if image:
        return Check(
            "compiler",
            WARN,
            f"BCC not importable ({bcc_error}); the cached program image {image} is used, but "
            "a new kernel or sklookupctl version will need BCC to compile the dispatcher",
            COMPILER_FIX,
        )
    return Check(
        "compiler",
        FAIL,
        f"BCC not importable ({bcc_error}) and no cached program image: the dispatcher cannot "
        "be loaded",
        COMPILER_FIX,
    )


def check_compiler() -> Check:
    path, problem = _cache_here()
    return judge_compiler(bcc_problem(), cached_image(), path is not None and not problem)


# -- memlock ---------------------------------------------------------------------------------


def _size(n: int) -> str:
    if n == resource.RLIM_INFINITY or n < 0:
        return "unlimited"
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def judge_memlock(release: str, soft: int, hard: int) -> Check:
    limit = f"RLIMIT_MEMLOCK {_size(soft)} (hard {_size(hard)})"
    version = parse_release(release)
    if version is not None and version >= MEMCG_SINCE:
        return Check(
            "memlock",
            OK,
            f"{limit}; does not matter: kernels 5.11+ charge BPF memory to the memory cgroup",
        )
    unlimited = soft == resource.RLIM_INFINITY or soft < 0
    if unlimited or soft >= MEMLOCK_LOW:
        return Check("memlock", OK, f"{limit}: enough for the maps of a large rule set")
    return Check(
        "memlock",
        WARN,
        f"{limit} on kernel {release}: before 5.11 BPF maps count against it, and large rule "
        "sets fail to load",
        "raise it: LimitMEMLOCK=infinity in the systemd unit, or ulimit -l unlimited in the shell",
    )


def check_memlock() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return judge_memlock(os.uname().release, soft, hard)


# -- namespaces ------------------------------------------------------------------------------


@dataclass
class NsFacts:
    """What doctor found about one namespace's state (store.Entry) and, when it steers, the
    namespace itself."""

    entry: store.Entry
    name: str  # how to call it: its name under /run/netns, its label, or its cookie
    netns: str = ""  # an -n argument for the fixes ("" when the namespace is gone)
    prog_id: int = 0
    tag: str = ""
    attached: list[int] | None = None  # sk_lookup programs attached there, in run order
    current: bool | None = None  # api.program_current of the live program
    problems: list[str] = field(default_factory=list)  # what could not be read


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def command(bpffs: str) -> str:
    """`sklookupctl`, with --bpffs when it is not the default, for the fixes."""
    return "sklookupctl" if bpffs == api.DEFAULT_BPFFS else f"sklookupctl --bpffs {bpffs}"


def judge_namespace(f: NsFacts, bpffs: str = api.DEFAULT_BPFFS) -> Check:
    e = f.entry
    name = f"netns {f.name}"
    skl = command(bpffs)
    ns = f.netns or "NS"
    detached_fix = (
        f"re-apply its rules ({skl} -n {ns} apply FILE, or any attach there) to attach "
        f"it again, or remove them: {skl} -n {ns} detach --all"
    )
    fixed = {
        "dead": (WARN, "the namespace is gone; its state is left in bpffs", f"{skl} gc"),
        "unfinished": (
            WARN,
            "left by a command that was killed before it went live: it never steered",
            f"{skl} gc",
        ),
        "damaged-dead": (
            WARN,
            f"damaged state of a namespace that is gone ({e.problem})",
            f"{skl} gc",
        ),
        "damaged": (
            FAIL,
            f"damaged state: {e.problem}",
            f"{skl} -n {ns} detach --all removes it; then attach or apply again",
        ),
        "other-layout": (
            WARN,
            "state of an earlier sklookupctl (another layout): it steers, but writing commands "
            "refuse it",
            f"{skl} upgrade --all",
        ),
        "other-layout-dead": (
            WARN,
            "state of another sklookupctl version, and the namespace is gone",
            f"{skl} gc",
        ),
        "detached": (
            WARN,
            "DETACHED: its link no longer runs in the namespace (something else detached it), "
            "so nothing of it steers",
            detached_fix,
        ),
    }
    if e.state in fixed:
        status, detail, fix = fixed[e.state]
        if e.stale and e.state == "detached":
            fix += f"; {skl} gc retires its stale generations"
        return Check(name, status, f"{detail}; state in {e.path}", fix)
    if e.state != "steering":
        return Check(name, WARN, f"state {e.state}; state in {e.path}", f"{skl} gc")
    detail = (
        f"steering: generation {e.generation}, {_plural(e.rules, 'rule')}, "
        f"{_plural(e.targets, 'target')}"
    )
    issues: list[str] = []
    fixes: list[str] = []
    if e.stale:
        issues.append(f"{_plural(e.stale, 'stale generation')} left by a killed command")
        fixes.append(f"{skl} gc")
    if e.dead_traces:
        issues.append("a killed `trace` left its traced copy behind")
        fixes.append(f"{skl} gc")
    attached = f.attached or []
    others = [p for p in attached if p != f.prog_id]
    if others:
        pos = attached.index(f.prog_id) if f.prog_id in attached else len(attached)
        before, after = attached[:pos], attached[pos + 1 :]
        order = ", ".join(
            f"{_ids(ids)} {'runs' if len(ids) == 1 else 'run'} {when} ours"
            for ids, when in ((before, "before"), (after, "after"))
            if ids
        )
        issues.append(
            f"other sk_lookup programs attached: {order}; their verdicts combine with ours (a "
            "drop by any refuses the connection; the last socket selected wins)"
        )
        fixes.append(
            f"check that program {_ids(others)} is meant to run there "
            f"(bpftool prog show id {others[0]})"
            if len(others) == 1
            else f"check that programs {_ids(others)} are meant to run there "
            f"(bpftool prog show id {others[0]}, ...)"
        )
    if f.current is False:
        issues.append(f"it runs program tag {f.tag}, not this version's dispatcher")
        fixes.append(f"{skl} -n {ns} upgrade")
    elif f.current is None and f.tag:
        detail += " (whether its program is this version's is unknown: no cached image)"
    issues += f.problems
    if f.problems:
        fixes.append(f"see {skl} -n {ns} status")
    if not issues:
        return Check(name, OK, detail)
    return Check(name, WARN, f"{detail}; " + "; ".join(issues), "; ".join(dict.fromkeys(fixes)))


@contextlib.contextmanager
def _reading(bpffs: str, wait: float) -> Iterator[store.Store]:
    """The store under a shared lock (Store.locked). Where the lock directory is missing
    (state of an older version), taking the lock would make it: read without it instead."""
    base = store.base_dir(bpffs)
    if os.path.isdir(base) and not os.path.lexists(os.path.join(base, trust.LOCK)):
        yield store.Store(bpffs, base, exclusive=False)
        return
    with store.Store.locked(bpffs, exclusive=False, wait=wait) as held:
        yield held


def _cache_unchanged() -> bool:
    """Whether compiler.cache_dir (through api.program_current) would find the cache as it is,
    making and changing nothing: it exists, is trusted, and is 0700 or not ours to chmod."""
    path, problem = _cache_here()
    if path is None or problem:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (
        st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) == 0o700
    )


def namespace_facts(bpffs: str, wait: float) -> list[NsFacts]:
    """Every namespace's state (Store.entries, under the shared lock); for those that steer,
    the live program and what else is attached in the namespace."""
    from . import netns as nsmod
    from .bpfsys import query_netns_programs

    names: dict[int, list[str]] = {}
    for item in nsmod.list_named():
        names.setdefault(int(str(item["inode"])), []).append(str(item["name"]))
    out: list[NsFacts] = []
    with _reading(bpffs, wait) as held:
        for e in held.entries():
            named = names.get(e.inode, []) if "dead" not in e.state else []
            who = ", ".join(named) or e.label or f"cookie {e.cookie}"
            f = NsFacts(e, who, named[0] if named else "")
            out.append(f)
            if e.state != "steering":
                continue
            try:
                with store.Dispatcher.open(e.path, e.cookie, readonly=True) as d:
                    if d.gen is None:
                        raise EnvironmentProblem("its link went away while doctor looked")
                    # the program the link runs (a traced copy while `trace` runs) is ours
                    # in the run order; the generation's own program is what has a version
                    running = d.link.info().prog_id if d.link is not None else 0
                    info = d.program.info()
                    f.prog_id, f.tag = int(running or info.id), bytes(info.tag).hex()
            except (SklookupError, OSError) as err:
                f.problems.append(f"its program could not be read ({_reason(err)})")
    can_tell = _cache_unchanged()
    for f in out:
        e = f.entry
        if e.state == "damaged" and not e.inode:
            # its records could not be read: which namespace it is, from its cookie
            found = nsmod.find_cookie(e.cookie)
            if found is not None:
                with contextlib.suppress(OSError):
                    named = names.get(os.stat(found).st_ino, [])
                    f.netns = named[0] if named else found
                    f.name = ", ".join(named) or found
            continue
        if e.state not in ("steering", "detached"):
            continue
        path = nsmod.find_alive(e.inode, e.cookie)
        if path is None:
            continue
        f.netns = f.netns or path
        if e.state != "steering":
            continue
        try:
            with nsmod.open_netns(path) as ns:
                f.attached = query_netns_programs(ns.fd)
        except (SklookupError, OSError) as err:
            f.problems.append(f"its namespace could not be queried ({_reason(err)})")
        if f.tag and can_tell:
            f.current = api.program_current(f.tag)
    return out


def _reason(e: BaseException) -> str:
    if isinstance(e, SklookupError):
        return e.message
    if isinstance(e, OSError):
        return str(e.strerror or e)
    return str(e)


def check_namespaces(bpffs: str, wait: float) -> list[Check]:
    try:
        store.base_dir(bpffs)
    except SklookupError as e:
        return [Check("netns", WARN, f"not checked: {e.message}", "see the bpffs check")]
    try:
        facts = namespace_facts(bpffs, wait)
    except PermissionDenied as e:
        return [Check("netns", WARN, f"not checked: {e.message}", "run doctor as root")]
    except PermissionError:
        return [
            Check(
                "netns",
                WARN,
                f"not checked: the state in {bpffs} is root's (running as uid {os.geteuid()})",
                "run doctor as root",
            )
        ]
    except SklookupError as e:
        return [Check("netns", WARN, f"not checked: {e.message}", e.hint or "see the checks above")]
    if not facts:
        return [Check("netns", OK, f"no namespace has sklookupctl state in {bpffs}")]
    return [judge_namespace(f, bpffs) for f in facts]
