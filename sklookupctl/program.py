"""Load the dispatcher program against a given set of maps, without BCC when possible.

Every rule-set change loads a fresh copy of the program bound to fresh maps (sized to the rule
set). Compiling takes BCC about 0.3 s, so the compiled instructions are cached (in
/var/cache/sklookupctl for root: see compiler.cache_dir), with each map reference replaced by
the map's index in layout.PROGRAM_MAPS; loading patches in the real map fds and calls
BPF_PROG_LOAD. A cache file is read only if it is the effective user's and nobody else can
write it (trust.open_cache_file).

The cache is keyed by everything the instructions depend on: the C source, the layout version,
the BCC version and the kernel release. A file is used only if its checksum holds and every map
reference in it is a known index; otherwise, or if the kernel refuses it, the program is compiled
again and the file replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct

from . import compiler, layout, trust
from .bpfsys import BpfError, Program
from .errors import CompileError

MAGIC = b"sklookupctl-image-1\n"
MAX_IMAGE = 1 << 20  # bytes: the dispatcher is a few KiB
_INSN = struct.Struct("<BBhi")


def _bcc_version() -> str:
    """BCC's version from its package metadata, read without importing bcc (slow)."""
    for d in ("/usr/lib/python3/dist-packages",):
        with contextlib.suppress(OSError):
            for name in os.listdir(d):
                if name.startswith("bcc-") and name.endswith((".egg-info", ".dist-info")):
                    return name
    return "unknown"


def cache_key(source: str) -> str:
    h = hashlib.sha256()
    for part in (source, str(layout.LAYOUT_VERSION), _bcc_version(), os.uname().release):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


TRACE_DEFINE = "#define SKL_TRACE 1\n"


def source(traced: bool = False) -> str:
    """The C source of the dispatcher, or of its traced variant (see bpf/dispatcher.c)."""
    return (TRACE_DEFINE if traced else "") + compiler.read_source()


def maps_of(traced: bool) -> tuple[str, ...]:
    return layout.TRACE_MAPS if traced else layout.PROGRAM_MAPS


def _cache_path(source: str) -> str | None:
    d = compiler.cache_dir()
    return None if d is None else os.path.join(d, f"dispatcher-{cache_key(source)}.img")


def _valid(insns: bytes, maps: tuple[str, ...]) -> bool:
    if not insns or len(insns) % 8:
        return False
    for off in range(0, len(insns), 8):
        code, regs, _o, imm = _INSN.unpack_from(insns, off)
        src = regs >> 4
        if code != compiler.BPF_LD_IMM64 or not src:
            continue
        if src != compiler.BPF_PSEUDO_MAP_FD or not 0 <= imm < len(maps):
            return False
    return True


def _read_cache(path: str, maps: tuple[str, ...] = layout.PROGRAM_MAPS) -> bytes | None:
    fd = trust.open_cache_file(path)  # ours, and writable by nobody else; else not used
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_IMAGE)
    except OSError:
        return None
    if not data.startswith(MAGIC):
        return None
    digest, insns = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(insns).digest() != digest or not _valid(insns, maps):
        return None
    return insns


def _write_cache(path: str | None, insns: bytes) -> None:
    """Best effort: a cache that cannot be written only costs the next run a compile."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=".img-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(insns).digest() + insns)
            os.rename(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def image(fresh: bool = False, traced: bool = False) -> tuple[bytes, bool]:
    """The program's instructions with map placeholders (indexes in `maps_of(traced)`); True
    when they came from the cache."""
    src = source(traced)
    maps = maps_of(traced)
    path = _cache_path(src)
    if not fresh and path is not None:
        insns = _read_cache(path, maps)
        if insns is not None:
            return insns, True
    insns = compiler.compile_image(src, maps)
    _write_cache(path, insns)
    return insns, False


def tags(compile_: bool = True, traced: bool = False) -> set[str] | None:
    """The tags the kernel gives this version's dispatcher: the first 8 bytes of a digest over
    the instructions with map references zeroed (SHA-256 on newer kernels, SHA-1 before).
    Without `compile_`, from the cache only (None when it has no image): `status` never
    compiles."""
    if compile_:
        insns, _ = image(traced=traced)
    else:
        path = _cache_path(source(traced))
        cached = _read_cache(path, maps_of(traced)) if path is not None else None
        if cached is None:
            return None
        insns = cached
    out = bytearray(insns)
    for off in range(0, len(out), 8):
        code, regs, o, _imm = _INSN.unpack_from(out, off)
        if code == compiler.BPF_LD_IMM64 and regs >> 4 == compiler.BPF_PSEUDO_MAP_FD:
            _INSN.pack_into(out, off, code, regs, o, 0)
    return {hashlib.sha256(out).digest()[:8].hex(), hashlib.sha1(out).digest()[:8].hex()}


def _relocate(insns: bytes, fds: dict[str, int], maps: tuple[str, ...]) -> bytes:
    out = bytearray(insns)
    for off in range(0, len(out), 8):
        code, regs, o, imm = _INSN.unpack_from(out, off)
        if code == compiler.BPF_LD_IMM64 and regs >> 4 == compiler.BPF_PSEUDO_MAP_FD:
            _INSN.pack_into(out, off, code, regs, o, fds[maps[imm]])
    return bytes(out)


def load(fds: dict[str, int], traced: bool = False) -> Program:
    """Load the dispatcher bound to the maps in `fds` (one fd per name in PROGRAM_MAPS; with
    `traced`, the traced variant, which also needs TRACE_MAPS' `events` and `lost`)."""
    maps = maps_of(traced)
    name = "skl_trace" if traced else "skl_dispatch"
    insns, cached = image(traced=traced)
    try:
        return Program.load_sk_lookup(_relocate(insns, fds, maps), name)
    except BpfError as e:
        if not cached:
            raise CompileError(
                f"the kernel's verifier rejected the dispatcher ({e.strerror})", e.log.strip()
            ) from None
    # a cached image the kernel refuses (another kernel build with the same release?): once more
    # from source
    insns, _ = image(fresh=True, traced=traced)
    try:
        return Program.load_sk_lookup(_relocate(insns, fds, maps), name)
    except BpfError as e:
        raise CompileError(
            f"the kernel's verifier rejected the dispatcher ({e.strerror})", e.log.strip()
        ) from None
