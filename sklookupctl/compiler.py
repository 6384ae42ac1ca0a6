"""Compile the dispatcher with BCC. The only module that imports bcc.

BCC wants a kernel source tree. Where the running kernel has none (no /lib/modules, as on
kernels without a headers package), a stand-in is made from the uapi headers of linux-libc-dev:
sk_lookup programs need nothing more, since BCC brings its own copy of linux/bpf.h.
The compiler's output reaches the user only when something fails. BCC does not load the
program: program.py does, from the instructions compiled here (and cached).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat
import struct
from collections.abc import Iterator
from typing import Any

from . import layout, notices, trust
from .errors import CompileError, EnvironmentProblem

STANDIN_VERSION = 2  # 2: per architecture
# BCC's name of the architecture (its arch/ARCH/include) and Debian's multiarch triplet, per
# machine: the stand-in's asm headers come from linux-libc-dev of this architecture
ARCHES = {
    "x86_64": ("x86", "x86_64-linux-gnu"),
    "aarch64": ("arm64", "aarch64-linux-gnu"),
    "riscv64": ("riscv", "riscv64-linux-gnu"),
    "ppc64le": ("powerpc", "powerpc64le-linux-gnu"),
}


def uapi_dirs(machine: str = "") -> dict[str, str]:
    """The stand-in's directories and where their headers come from, for `machine`."""
    arch, triplet = ARCHES.get(machine or os.uname().machine, ARCHES["x86_64"])
    return {
        "include/uapi/linux": "/usr/include/linux",
        "include/uapi/asm-generic": "/usr/include/asm-generic",
        f"arch/{arch}/include/uapi/asm": f"/usr/include/{triplet}/asm",
    }


def empty_headers(machine: str = "") -> tuple[str, ...]:
    """Kernel-internal headers BCC's helpers.h includes and sk_lookup programs do not use."""
    arch, _ = ARCHES.get(machine or os.uname().machine, ARCHES["x86_64"])
    return ("include/uapi/linux/bpf.h", "include/linux/log2.h", f"arch/{arch}/include/asm/page.h")


KCONFIG_STANDIN = """\
/* sklookupctl: stand-in for a kernel tree's kconfig.h (no kernel headers on this machine) */
#define CONFIG_BPF_SYSCALL 1
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;
"""
_INSN = struct.Struct("<BBhi")


def read_source() -> str:
    import importlib.resources  # (this module's heavier imports wait until a compile)

    return importlib.resources.files("sklookupctl.bpf").joinpath("dispatcher.c").read_text()


CACHE_ENV = "SKLOOKUPCTL_CACHE_DIR"
ROOT_CACHE = "/var/cache/sklookupctl"


def cache_dir() -> str | None:
    """The directory of compiled programs, made (0700) if missing: $SKLOOKUPCTL_CACHE_DIR
    (`--cache-dir`), else /var/cache/sklookupctl for root (never a user's HOME, which `sudo
    -E` keeps), else $XDG_CACHE_HOME/sklookupctl or ~/.cache/sklookupctl. None, with a notice,
    when that directory could have been written by someone else (trust.cache_problem) or
    cannot be made: the program is then compiled afresh and nothing is cached."""
    explicit = os.environ.get(CACHE_ENV) or ""
    home = os.environ.get("HOME", "")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return _cache_dir(explicit, os.geteuid(), home, xdg)


@functools.lru_cache(maxsize=8)
def _cache_dir(explicit: str, euid: int, home: str, xdg: str) -> str | None:
    if "\0" in explicit + home + xdg:
        notices.emit("no program cache: its path holds a NUL")
        return None
    if explicit:
        path = os.path.abspath(explicit)
    elif euid == 0:
        path = ROOT_CACHE
    elif os.path.isabs(xdg):
        path = os.path.join(xdg, "sklookupctl")
    elif os.path.isabs(home) and os.path.isdir(home):
        path = os.path.join(home, ".cache", "sklookupctl")
    else:
        notices.emit(f"no program cache: HOME ({home or 'unset'}) is not a directory")
        return None
    # resolved once: what is checked is what is used (a symlink on the way, flipped after the
    # check, must not lead elsewhere); every directory of `real` is then checked without
    # following links, so nobody else can change any of them afterwards
    real = os.path.realpath(path)
    problem = trust.cache_problem(real)
    if problem is None:
        try:
            os.makedirs(real, mode=0o700, exist_ok=True)
            st = os.lstat(real)
            if st.st_uid == euid and stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(real, 0o700)
        except OSError as e:
            problem = f"{e.filename or path}: {e.strerror}"
        else:
            problem = trust.cache_problem(real)
    if problem is not None:
        notices.emit(
            f"not using the program cache {path} ({problem}): compiling afresh; give a "
            f"directory of your own with --cache-dir or {CACHE_ENV}"
        )
        return None
    return real


@contextlib.contextmanager
def kernel_source() -> Iterator[str]:
    """The directory for BCC_KERNEL_SOURCE: the kernel's own header tree when it is complete,
    else the stand-in, kept in the cache (made in a private temporary directory, removed after,
    without a trusted one)."""
    import shutil

    tree = _kernel_tree()
    if tree is not None:
        yield tree
        return
    cache = cache_dir()
    made: str | None = None
    if cache is not None:
        target = os.path.join(cache, f"kernel-standin-{STANDIN_VERSION}")
        if _ours(os.path.join(target, "include/linux/kconfig.h")):
            made = target
        else:
            try:
                made = _make_standin(cache, target)
            except OSError as e:
                # the cache is best effort: full, read-only, a file system without files
                notices.emit(
                    f"cannot write to the program cache {cache} ({e.strerror}): compiling "
                    "without it"
                )
    if made is not None:
        yield made
        return
    tmp = _private_tmp()  # no (usable) cache: a private stand-in, removed after
    try:
        yield _make_standin(tmp, os.path.join(tmp, "standin"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kernel_tree(base: str = "") -> str | None:
    """The running kernel's own header tree, chosen as BCC 0.26 chooses it (`source` when both
    it and `build` are there, else `build`) and only when complete (it has kconfig.h). Without
    one, BCC would fall back to $TMPDIR/kheaders-RELEASE, which any user can make in /tmp: so
    the tree, or the stand-in, is always given explicitly (BCC_KERNEL_SOURCE)."""
    base = base or f"/lib/modules/{os.uname().release}"
    source, build = f"{base}/source", f"{base}/build"
    tree = source if os.path.isdir(source) and os.path.isdir(build) else build
    return tree if os.path.isfile(os.path.join(tree, "include/linux/kconfig.h")) else None


def _ours(path: str) -> bool:
    """Whether `path` and the directories from the cache down to it were made by the effective
    user or root (inside a trusted cache nobody else could have, but a check costs little)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid in (os.geteuid(), 0) and not stat.S_IMODE(st.st_mode) & 0o022


def _private_tmp(prefix: str = "sklookupctl-standin-") -> str:
    """A new 0700 directory in a parent nobody else can rename things in (never $TMPDIR, which
    `sudo -E` keeps from the user): /run for root, else /tmp (sticky)."""
    import tempfile

    for parent in ("/run", "/tmp", "/var/tmp"):
        if trust.cache_problem(os.path.join(parent, "sklookupctl-probe")) is None:
            with contextlib.suppress(OSError):
                return tempfile.mkdtemp(prefix=prefix, dir=parent)
    raise EnvironmentProblem(
        "no private place to build the kernel-header stand-in in",
        f"give a program cache of your own with --cache-dir or {CACHE_ENV}",
    )


def _make_standin(parent: str, target: str) -> str:
    import shutil
    import tempfile

    if not os.path.isfile("/usr/include/linux/bpf.h"):
        raise EnvironmentProblem(
            "no kernel headers for this kernel and no uapi headers to stand in for them",
            "apt-get install linux-libc-dev (scripts/setup does)",
        )
    tmp = tempfile.mkdtemp(prefix=".standin-", dir=parent)
    try:
        for rel, src in uapi_dirs().items():
            dst = os.path.join(tmp, rel)
            os.makedirs(dst)
            for name in os.listdir(src):
                os.symlink(os.path.join(src, name), os.path.join(dst, name))
        for rel in empty_headers():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            open(path, "w").close()
        with open(os.path.join(tmp, "include/linux/kconfig.h"), "w") as f:
            f.write(KCONFIG_STANDIN)
        try:
            os.rename(tmp, target)
        except OSError:
            # another sklookupctl made it meanwhile (in a cache only we and root can write):
            # used if it is a directory of ours, else this is an error
            if not (os.path.isdir(target) and not os.path.islink(target) and _ours(target)):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return target


@contextlib.contextmanager
def _capture_stderr() -> Iterator[list[str]]:
    """Send fd 2 to a temp file for the block; the list gets what was written."""
    import tempfile

    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1


def compile_image(source: str | None = None, maps: tuple[str, ...] = layout.PROGRAM_MAPS) -> bytes:
    """Compile the dispatcher with BCC and return its instructions, each map reference
    replaced by the map's index in `maps` (layout.PROGRAM_MAPS, or layout.TRACE_MAPS for the
    traced variant; see program.py, which loads it)."""
    try:
        import bcc
    except ImportError:
        raise EnvironmentProblem(
            "BCC's Python module (import bcc) is missing",
            "apt-get install python3-bpfcc, and run sklookupctl from /usr/bin/python3 or a venv "
            "made with --system-site-packages (scripts/setup does both)",
        ) from None
    src = source if source is not None else read_source()
    with kernel_source() as ksrc:
        return _compile(bcc, src, ksrc, maps)


# the whole environment BCC and clang see while compiling: nothing of the caller's (ARCH,
# BCC_KERNEL_SOURCE, CPATH, C_INCLUDE_PATH, TMPDIR... would each choose what gets compiled, and
# `sudo -E` keeps them from the user)
COMPILE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@contextlib.contextmanager
def _fixed_env(ksrc: str) -> Iterator[None]:
    """Compile with COMPILE_ENV, BCC_KERNEL_SOURCE always set, TMPDIR a private directory, and
    in / (BCC searches the working directory for headers: a directory of another user's, where
    root happens to be, must not supply any)."""
    import shutil
    import tempfile

    saved = dict(os.environ)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    tmp = _private_tmp("sklookupctl-tmp-")
    os.environ.clear()
    os.environ.update(COMPILE_ENV)
    os.environ["TMPDIR"] = tmp
    os.environ["BCC_KERNEL_SOURCE"] = ksrc
    # tempfile caches the directory it chose first: without this, a second compile in the same
    # process (the plain program, then its traced variant) would look in the removed one
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, tmp
    try:
        os.chdir("/")
        yield
    finally:
        os.fchdir(cwd)
        os.close(cwd)
        os.environ.clear()
        os.environ.update(saved)
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(tmp, ignore_errors=True)


def _compile(bcc: Any, src: str, ksrc: str, maps: tuple[str, ...]) -> bytes:
    with _fixed_env(ksrc):
        return _compile_here(bcc, src, maps)


def _compile_here(bcc: Any, src: str, maps: tuple[str, ...]) -> bytes:
    with _capture_stderr() as log:
        try:
            mod = bcc.BPF(text=src.encode(), cflags=["-w"])
        except Exception:
            mod = None
    if mod is None:
        raise CompileError("the dispatcher failed to compile", log[0].strip())
    try:
        lib = bcc.libbcc.lib
        start = lib.bpf_function_start(mod.module, b"dispatch")
        size = lib.bpf_function_size(mod.module, b"dispatch")
        if not start or not size:
            raise CompileError("the compiled dispatcher has no function `dispatch`", "")
        insns = bytearray(ctypes.string_at(start, size))
        index = {lib.bpf_table_fd(mod.module, n.encode()): i for i, n in enumerate(maps)}
        for off in range(0, len(insns), 8):
            code, regs, _off, imm = _INSN.unpack_from(insns, off)
            if code != BPF_LD_IMM64 or regs >> 4 == 0:
                continue
            if regs >> 4 != BPF_PSEUDO_MAP_FD or imm not in index:
                raise CompileError(
                    "the compiled dispatcher refers to a map sklookupctl does not know",
                    f"instruction {off // 8}: src {regs >> 4}, imm {imm}; every map must "
                    f"be one of {', '.join(maps)}",
                )
            _INSN.pack_into(insns, off, code, regs, _off, index[imm])
        return bytes(insns)
    finally:
        mod.cleanup()
