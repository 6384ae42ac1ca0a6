"""Userspace mirrors of the structs and constants in bpf/dispatcher.c, and of the records a
generation keeps for userspace. Keep the two in step; image.py encodes and decodes them."""

from __future__ import annotations

import ctypes

# Bumped whenever a struct below, a map or the directory layout changes: pinned state of another
# layout is refused. 4: a directory per netns cookie; every generation holds its own target table
# and a reference to the SOCKMAP; targets are blocks of slots (reuseport groups).
LAYOUT_VERSION = 4

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

# segment.flags / target record flags
TARGET_EXACT = 1  # assign with BPF_SK_LOOKUP_F_NO_REUSEPORT: this socket, not its group
TARGET_V6ONLY = 2  # record only: the socket is IPv6-only (cannot take IPv4 rules)
TARGET_ADDR_V6 = 4  # record only: the address declared is IPv6 (the socket's family may differ)
TARGET_WAITING = 8  # record only: loaded before its socket existed (apply --allow-missing)
SEGMENT_FLAGS = TARGET_EXACT  # the flags the program reads

# members of a reuseport group registered for one target (the program tries them in order)
MAX_MEMBERS = 16

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
        ("slot", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("slots", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
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
COUNTER_NAMES = ("lookups", "steered", "dropped", "passed", "missing", "errors")


class RuleRecord(ctypes.Structure):
    """A rule as stored for userspace (the `rules` map of a generation); index = rule number.
    `target` is the index of the rule's target in the generation's `targets` map."""

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


class TargetRecord(ctypes.Structure):
    """A target as stored for userspace (the `targets` map of a generation): its name, the
    address it was declared with, and its block of SOCKMAP slots."""

    _fields_ = [
        ("name", ctypes.c_char * 64),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("slots", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("slot", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
        ("pad2", ctypes.c_uint32),
    ]


class Meta(ctypes.Structure):
    """One per generation, userspace only."""

    _fields_ = [
        ("layout", ctypes.c_uint32),
        ("rules", ctypes.c_uint32),
        ("targets", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("netns_cookie", ctypes.c_uint64),
        ("netns_inode", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("label", ctypes.c_char * 64),  # the namespace as the writer was told (name or path)
    ]


# a value of the `record` map (userspace only): record.py's layout-independent rule set, in
# pieces of this size
RecordChunk = ctypes.c_uint8 * 4096

# `source` beside a generation's maps (optional, pinned after it went live): the digest of a
# rule file whose rules an apply found to be the generation's, written when the record's is
# another or none (rulefile.source_digest: hex, NUL padded)
SourceNote = ctypes.c_char * 64
SOURCE_NOTE = "source"

U32 = ctypes.c_uint32
U64 = ctypes.c_uint64

# The maps the program reads, in the order of the placeholders in its cached instructions.
PROGRAM_MAPS = ("sockets", "nodes", "entries", "segments", "counters")

# The traced variant (compiled with SKL_TRACE, run only while `sklookupctl trace` runs) reads
# these maps too: the ring buffer its decisions go to, and a per-CPU count of those it lost.
TRACE_MAPS = (*PROGRAM_MAPS, "events", "lost")

# SKL_WHY_*: why a lookup ended as it did
WHY = ("no-rule", "steered", "drop-rule", "missing-socket", "assign-error", "not-steerable")


class Event(ctypes.Structure):
    """mirrors struct event (the traced variant's ring buffer records)"""

    _fields_ = [
        ("time", ctypes.c_uint64),
        ("rule", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("why", ctypes.c_uint8),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("local", ctypes.c_uint8 * 16),
        ("remote", ctypes.c_uint8 * 16),
    ]
