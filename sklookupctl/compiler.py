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
import importlib.resources
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator

from . import layout
from .errors import CompileError, EnvironmentProblem

STANDIN_VERSION = 1
UAPI_DIRS = {
    "include/uapi/linux": "/usr/include/linux",
    "include/uapi/asm-generic": "/usr/include/asm-generic",
    "arch/x86/include/uapi/asm": "/usr/include/x86_64-linux-gnu/asm",
}
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
# BCC's helpers.h includes these kernel-internal headers; sk_lookup programs use nothing of them.
_INSN = struct.Struct("<BBhi")

EMPTY_HEADERS = ("include/uapi/linux/bpf.h", "include/linux/log2.h", "arch/x86/include/asm/page.h")


def read_source() -> str:
    return importlib.resources.files("sklookupctl.bpf").joinpath("dispatcher.c").read_text()


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sklookupctl")


def kernel_source() -> str | None:
    """A directory for BCC_KERNEL_SOURCE, or None when the kernel's own headers are present."""
    if os.path.isdir(f"/lib/modules/{os.uname().release}/build"):
        return None
    cache = cache_dir()
    target = os.path.join(cache, f"kernel-standin-{STANDIN_VERSION}")
    if os.path.isfile(os.path.join(target, "include/linux/kconfig.h")):
        return target
    if not os.path.isfile("/usr/include/linux/bpf.h"):
        raise EnvironmentProblem(
            "no kernel headers for this kernel and no uapi headers to stand in for them",
            "apt-get install linux-libc-dev (scripts/setup does)",
        )
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".standin-", dir=cache)
    try:
        for rel, src in UAPI_DIRS.items():
            dst = os.path.join(tmp, rel)
            os.makedirs(dst)
            for name in os.listdir(src):
                os.symlink(os.path.join(src, name), os.path.join(dst, name))
        for rel in EMPTY_HEADERS:
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
            if not os.path.isdir(target):  # another process won the race otherwise
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return target


@contextlib.contextmanager
def _capture_stderr() -> Iterator[list[str]]:
    """Send fd 2 to a temp file for the block; the list gets what was written."""
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


def compile_image(source: str | None = None) -> bytes:
    """Compile the dispatcher with BCC and return its instructions, each map reference
    replaced by the map's index in layout.PROGRAM_MAPS (see program.py, which loads it)."""
    try:
        import bcc
    except ImportError:
        raise EnvironmentProblem(
            "BCC's Python module (import bcc) is missing",
            "apt-get install python3-bpfcc, and run sklookupctl from /usr/bin/python3 or a venv "
            "made with --system-site-packages (scripts/setup does both)",
        ) from None
    src = source if source is not None else read_source()
    ksrc = kernel_source()
    old_env = os.environ.get("BCC_KERNEL_SOURCE")
    if ksrc:
        os.environ["BCC_KERNEL_SOURCE"] = ksrc
    try:
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
            index = {
                lib.bpf_table_fd(mod.module, n.encode()): i
                for i, n in enumerate(layout.PROGRAM_MAPS)
            }
            for off in range(0, len(insns), 8):
                code, regs, _off, imm = _INSN.unpack_from(insns, off)
                if code != BPF_LD_IMM64 or regs >> 4 == 0:
                    continue
                if regs >> 4 != BPF_PSEUDO_MAP_FD or imm not in index:
                    raise CompileError(
                        "the compiled dispatcher refers to a map sklookupctl does not know",
                        f"instruction {off // 8}: src {regs >> 4}, imm {imm}; every map must "
                        "be one of layout.PROGRAM_MAPS",
                    )
                _INSN.pack_into(insns, off, code, regs, _off, index[imm])
            return bytes(insns)
        finally:
            mod.cleanup()
    finally:
        if ksrc:
            if old_env is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = old_env
