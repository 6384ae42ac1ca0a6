"""The compiled-program cache is used only when it is exactly what was written: magic,
checksum and every map reference checked."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from sklookupctl import compiler, layout, program

INSN = struct.Struct("<BBhi")
EXIT = INSN.pack(0x95, 0, 0, 0)
MOV_R0_0 = INSN.pack(0xB7, 0, 0, 0)


def map_ref(index: int, src: int = compiler.BPF_PSEUDO_MAP_FD) -> bytes:
    """A 16-byte ld_imm64 of map `index` into r1."""
    return INSN.pack(compiler.BPF_LD_IMM64, 1 | src << 4, 0, index) + INSN.pack(0, 0, 0, 0)


GOOD = map_ref(0) + map_ref(len(layout.PROGRAM_MAPS) - 1) + MOV_R0_0 + EXIT


def write(path: Path, insns: bytes, *, magic: bytes = program.MAGIC, digest: bytes = b"") -> None:
    path.write_bytes(magic + (digest or hashlib.sha256(insns).digest()) + insns)


def test_a_good_image_is_read(tmp_path: Path) -> None:
    p = tmp_path / "img"
    write(p, GOOD)
    assert program._read_cache(str(p)) == GOOD


@pytest.mark.parametrize(
    "case",
    [
        "magic",
        "checksum",
        "truncated",
        "odd length",
        "empty",
        "unknown map",
        "negative map",
        "map by value",
    ],
)
def test_a_bad_image_is_refused(tmp_path: Path, case: str) -> None:
    p = tmp_path / "img"
    if case == "magic":
        write(p, GOOD, magic=b"sklookupctl-image-0\n")
    elif case == "checksum":
        write(p, GOOD, digest=hashlib.sha256(b"other").digest())
    elif case == "truncated":
        write(p, GOOD)
        p.write_bytes(p.read_bytes()[:-8])
    elif case == "odd length":
        write(p, GOOD + b"\0\0\0")
    elif case == "empty":
        write(p, b"")
    elif case == "unknown map":
        write(p, map_ref(len(layout.PROGRAM_MAPS)) + EXIT)
    elif case == "negative map":
        write(p, map_ref(-1) + EXIT)
    elif case == "map by value":
        write(p, map_ref(0, src=2) + EXIT)  # BPF_PSEUDO_MAP_VALUE: not what we write
    assert program._read_cache(str(p)) is None


def test_a_missing_or_unreadable_file_is_no_cache(tmp_path: Path) -> None:
    assert program._read_cache(str(tmp_path / "nope")) is None
    assert program._read_cache(str(tmp_path)) is None  # a directory


def test_relocation_puts_each_map_fd_at_its_reference() -> None:
    fds = {name: 100 + i for i, name in enumerate(layout.PROGRAM_MAPS)}
    out = program._relocate(GOOD, fds, layout.PROGRAM_MAPS)
    assert INSN.unpack_from(out, 0)[3] == 100
    assert INSN.unpack_from(out, 16)[3] == 100 + len(layout.PROGRAM_MAPS) - 1
    assert out[32:] == GOOD[32:]


def test_the_key_covers_the_source() -> None:
    assert program.cache_key("a") != program.cache_key("b")
    assert program.cache_key("a") == program.cache_key("a")
