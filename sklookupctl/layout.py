"""Userspace mirrors of the structs and constants in bpf/dispatcher.c. Keep the two in step."""

from __future__ import annotations

import ctypes

# Bumped whenever a struct below or a map changes: pinned state of another layout is refused.
LAYOUT_VERSION = 3

MAX_TARGETS = 4096

NODE_FLAG = 0x80000000
NODE_STEPS = 36
MAX_SKIP = 64
MAX_STRIDE = 16
MIN_STRIDE = 4

ACTION_NONE = 0
ACTION_STEER = 1
ACTION_DROP = 2

MISSING_DROP = 0
MISSING_PASS = 1

# roots of the trie, nodes[0..3]
ROOTS = {("tcp", 4): 0, ("tcp", 6): 1, ("udp", 4): 2, ("udp", 6): 3}


class Node(ctypes.Structure):
    """mirrors struct node"""

    _fields_ = [
        ("fallback", ctypes.c_uint64),
        ("skip_bits", ctypes.c_uint64),
        ("leaf", ctypes.c_uint64),
        ("base", ctypes.c_uint32),
        ("skip", ctypes.c_uint8),
        ("stride", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class Segment(ctypes.Structure):
    """mirrors struct segment"""

    _fields_ = [
        ("lo", ctypes.c_uint16),
        ("action", ctypes.c_uint8),
        ("on_missing", ctypes.c_uint8),
        ("target", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class Counters(ctypes.Structure):
    """mirrors struct counters"""

    _fields_ = [
        ("steered", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("passed", ctypes.c_uint64),
        ("missing", ctypes.c_uint64),
        ("errors", ctypes.c_uint64),
    ]


# what the kernel counts, in struct order; `lookups` (steered + dropped + passed) is derived
KERNEL_COUNTERS = ("steered", "dropped", "passed", "missing", "errors")
COUNTER_NAMES = ("lookups", "steered", "dropped", "missing", "errors")


class RuleRecord(ctypes.Structure):
    """A rule as stored for userspace (the `rules` map of a generation); index = rule number."""

    _fields_ = [
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("prefixlen", ctypes.c_uint8),
        ("action", ctypes.c_uint8),
        ("on_missing", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("target", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class Meta(ctypes.Structure):
    """One per generation, userspace only."""

    _fields_ = [
        ("layout", ctypes.c_uint32),
        ("rules", ctypes.c_uint32),
        ("netns_cookie", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
    ]


class TargetInfo(ctypes.Structure):
    """The `targets` map (userspace only): what a target is called and where it listens."""

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

# The maps the program reads, in the order of the placeholders in its cached instructions.
PROGRAM_MAPS = ("sockets", "nodes", "entries", "segments", "counters")
