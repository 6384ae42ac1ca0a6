"""Userspace mirrors of the structs and constants in bpf/dispatcher.c. Keep the two in step."""

from __future__ import annotations

import ctypes

# Sizes, passed to the compiler as -D so the C and Python agree.
MAX_TARGETS = 4096
MAX_RULES = 65536
MAX_PREFIXES = 131072
SEGMENTS_PER_GEN = 262144

# Bumped whenever a struct below or a map changes: pinned state of another layout is refused.
LAYOUT_VERSION = 1

ACTION_NONE = 0
ACTION_STEER = 1
ACTION_DROP = 2

MISSING_DROP = 0
MISSING_PASS = 1

# Map names, as declared in the C file and pinned under the netns directory.
MAP_NAMES = ("sockets", "prefixes", "segments", "config", "rules", "targets")

Addr = ctypes.c_uint32 * 4


class LpmKey(ctypes.Structure):
    """mirrors struct lpm_key"""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("gen", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 16),
    ]


class LpmValue(ctypes.Structure):
    """mirrors struct lpm_value"""

    _fields_ = [("start", ctypes.c_uint32), ("count", ctypes.c_uint32)]


class Segment(ctypes.Structure):
    """mirrors struct segment"""

    _fields_ = [
        ("lo", ctypes.c_uint16),
        ("action", ctypes.c_uint8),
        ("on_missing", ctypes.c_uint8),
        ("target", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
    ]


class Config(ctypes.Structure):
    """mirrors struct config"""

    _fields_ = [
        ("gen", ctypes.c_uint32),
        ("layout", ctypes.c_uint32),
        ("netns_cookie", ctypes.c_uint64),
    ]


class RuleKey(ctypes.Structure):
    """mirrors struct rule_key"""

    _fields_ = [
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("prefixlen", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
    ]


class RuleValue(ctypes.Structure):
    """mirrors struct rule_value"""

    _fields_ = [
        ("target", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("on_missing", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class TargetInfo(ctypes.Structure):
    """mirrors struct target_info"""

    _fields_ = [
        ("name", ctypes.c_char * 64),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
        ("cookie", ctypes.c_uint64),
    ]


U32 = ctypes.c_uint32
U64 = ctypes.c_uint64

# (key size, value size, max entries) each pinned map must have: checked before reusing pins.
MAP_SHAPES: dict[str, tuple[int, int, int]] = {
    "sockets": (4, 8, MAX_TARGETS),
    "prefixes": (ctypes.sizeof(LpmKey), ctypes.sizeof(LpmValue), MAX_PREFIXES),
    "segments": (4, ctypes.sizeof(Segment), 2 * SEGMENTS_PER_GEN),
    "config": (4, ctypes.sizeof(Config), 1),
    "rules": (ctypes.sizeof(RuleKey), ctypes.sizeof(RuleValue), MAX_RULES),
    "targets": (4, ctypes.sizeof(TargetInfo), MAX_TARGETS),
}

CFLAGS = [
    f"-DSKL_MAX_TARGETS={MAX_TARGETS}",
    f"-DSKL_MAX_RULES={MAX_RULES}",
    f"-DSKL_MAX_PREFIXES={MAX_PREFIXES}",
    f"-DSKL_SEGMENTS_PER_GEN={SEGMENTS_PER_GEN}",
]
