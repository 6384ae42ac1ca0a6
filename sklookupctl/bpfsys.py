"""The bpf() system call, through ctypes: maps, pins, links, object info, queries, test runs.

The only module that talks bpf() directly. It does not import BCC, so commands that only read
or change rules of an already loaded dispatcher stay fast. Objects own their fd: close them (or
use them as context managers) when done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# __NR_bpf: the syscall numbers differ per architecture (asm/unistd.h); arm64 and riscv64 use
# the generic table
SYS_BPF_BY_MACHINE = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i686": 357, "ppc64le": 361}
SYS_BPF = SYS_BPF_BY_MACHINE.get(os.uname().machine, 321)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

BPF_SK_LOOKUP = 36
BPF_PROG_TYPE_SK_LOOKUP = 30

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_RINGBUF = 27

BPF_F_MMAPABLE = 1 << 10
BPF_F_RDONLY = 1 << 3  # BPF_OBJ_GET: a read-only fd (maps and programs; the kernel has no
# read-only link fds)
BPF_LINK_TYPE_NETNS = 5
BPF_F_REPLACE = 1 << 2

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_FS_MAGIC = 0xCAFE4A11


class BpfError(OSError):
    """A failed bpf() command; `op` names it."""

    def __init__(self, op: str, err: int) -> None:
        super().__init__(err, f"{op}: {os.strerror(err)}")
        self.op = op
        self.log = ""  # the verifier's log, for a failed program load


class _Attr(ctypes.Structure):
    # union bpf_attr is 160 bytes on 6.x; pass a zeroed buffer of that size
    _fields_ = [("raw", ctypes.c_uint8 * 160)]


def _bpf(cmd: int, attr: ctypes.Structure, op: str) -> int:
    buf = _Attr()
    ctypes.memmove(ctypes.byref(buf), ctypes.byref(attr), ctypes.sizeof(attr))
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.byref(buf), ctypes.sizeof(buf))
    err = ctypes.get_errno()
    # what the kernel wrote back, also with an error (a batch lookup that reached the end of
    # its map fails with ENOENT and says in `count` how many it copied)
    ctypes.memmove(ctypes.byref(attr), ctypes.byref(buf), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(op, err)
    return int(ret)


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
    ]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class _IdAttr(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class ProgInfo(ctypes.Structure):
    """mirrors the head of struct bpf_prog_info"""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    """mirrors the head of struct bpf_map_info"""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class LinkInfo(ctypes.Structure):
    """mirrors the head of struct bpf_link_info, with its netns member"""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("netns_ino", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    ]


_InfoT = TypeVar("_InfoT", ProgInfo, MapInfo, LinkInfo)


def _get_info(fd: int, info: _InfoT) -> _InfoT:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "get object info")
    return info


class Fd:
    """A file descriptor this object owns."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self: _SelfT) -> _SelfT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()

    def pin(self, path: str) -> None:
        name = os.fsencode(path)
        attr = _ObjAttr(
            pathname=ctypes.cast(ctypes.c_char_p(name), ctypes.c_void_p).value or 0, bpf_fd=self.fd
        )
        _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


_SelfT = TypeVar("_SelfT", bound=Fd)


def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned object; returns a new fd. FileNotFoundError when nothing is pinned there."""
    name = ctypes.c_char_p(os.fsencode(path))
    attr = _ObjAttr(
        pathname=ctypes.cast(name, ctypes.c_void_p).value or 0,
        file_flags=BPF_F_RDONLY if readonly else 0,
    )
    try:
        return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
        raise


K = TypeVar("K", bound=Any)
V = TypeVar("V", bound=Any)


class Map(Fd, Generic[K, V]):
    """A BPF map with ctypes key and value types."""

    def __init__(
        self, fd: int, key_type: type[K], value_type: type[V], readonly: bool = False
    ) -> None:
        super().__init__(fd)
        self.key_type = key_type
        self.value_type = value_type
        self.readonly = readonly

    @classmethod
    def from_pin(
        cls, path: str, key_type: type[K], value_type: type[V], readonly: bool = False
    ) -> Map[K, V]:
        return cls(obj_get(path, readonly), key_type, value_type, readonly)

    @classmethod
    def create(
        cls,
        map_type: int,
        key_type: type[K],
        value_type: type[V],
        max_entries: int,
        name: str,
        flags: int = 0,
    ) -> Map[K, V]:
        attr = _MapCreateAttr(
            map_type=map_type,
            key_size=ctypes.sizeof(key_type),
            value_size=ctypes.sizeof(value_type),
            max_entries=max_entries,
            map_flags=flags,
            map_name=name.encode()[:15],
        )
        return cls(_bpf(BPF_MAP_CREATE, attr, f"create map {name}"), key_type, value_type)

    def info(self) -> MapInfo:
        return _get_info(self.fd, MapInfo())

    def mmap(self) -> mmap.mmap:
        """Map an ARRAY made with BPF_F_MMAPABLE into memory, read-write (the kernel maps no
        fd opened read-only: read those with lookup_batch_raw)."""
        info = self.info()
        size = info.value_size * info.max_entries
        pages = max(1, -(-size // mmap.PAGESIZE))
        return mmap.mmap(self.fd, pages * mmap.PAGESIZE, mmap.MAP_SHARED)

    def memlock(self) -> int:
        """Bytes of kernel memory the map holds, as the kernel accounts it (fdinfo memlock)."""
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
        return 0

    def lookup_batch_raw(self, count: int, value_size: int) -> bytearray:
        """The values of keys 0..count-1 of an ARRAY (per-CPU: `value_size` covers every
        CPU's copy), in one BPF_MAP_LOOKUP_BATCH per chunk, written by the kernel straight
        into one buffer, which is returned as it is (a large per-CPU map is megabytes: copies
        cost)."""
        if count <= 0:
            return bytearray()
        out = bytearray(count * value_size)
        view = (ctypes.c_char * len(out)).from_buffer(out)
        chunk = 65536
        keys = (ctypes.c_uint32 * min(chunk, count))()
        start: int | None = None
        got = 0
        try:
            while got < count:
                want = min(chunk, count - got)
                in_b = ctypes.c_uint32(start or 0)
                out_b = ctypes.c_uint32(0)
                attr = _BatchAttr(
                    in_batch=ctypes.addressof(in_b) if start is not None else 0,
                    out_batch=ctypes.addressof(out_b),
                    keys=ctypes.addressof(keys),
                    values=ctypes.addressof(view) + got * value_size,
                    count=want,
                    map_fd=self.fd,
                )
                done = False
                try:
                    _bpf(BPF_MAP_LOOKUP_BATCH, attr, "map batch lookup")
                except BpfError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    done = True
                got += attr.count
                if done or attr.count == 0:
                    break
                start = out_b.value
        finally:
            del view  # the buffer is ours again
        del out[got * value_size :]
        return out

    def lookup(self, key: K) -> V | None:
        value: V = self.value_type()
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr, "map lookup")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return value

    def update(self, key: K, value: Any, flags: int = BPF_ANY) -> None:
        attr = _ElemAttr(
            map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(value), flags=flags
        )
        _bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")

    def delete(self, key: K) -> bool:
        """Delete `key`; False when it was not there."""
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr, "map delete")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[K]:
        """All keys. Collected first, so callers may delete while iterating."""
        found: list[K] = []
        key: K | None = None
        while True:
            nxt = self.key_type()
            attr = _ElemAttr(
                map_fd=self.fd,
                key=ctypes.addressof(key) if key is not None else 0,
                value=ctypes.addressof(nxt),
            )
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map iterate")
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    break
                raise
            found.append(nxt)
            key = nxt
        return iter(found)

    def items(self) -> Iterator[tuple[K, V]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v


class RingBuffer(Fd):
    """A BPF ring buffer map, read from userspace: the consumer position is a page mapped
    read-write, the producer position and the data (mapped twice in a row, so that a record
    that wraps reads in one piece) are mapped read-only after it."""

    BUSY = 1 << 31  # the record is still being written
    DISCARD = 1 << 30  # the record was dropped by its writer
    HEADER = 8  # u32 length and flags, u32 page offset

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.size = int(_get_info(fd, MapInfo()).max_entries)
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._data = mmap.mmap(
            fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )

    @classmethod
    def create(cls, size: int, name: str) -> RingBuffer:
        """`size`: a power of two, a multiple of the page size."""
        attr = _MapCreateAttr(
            map_type=BPF_MAP_TYPE_RINGBUF, max_entries=size, map_name=name.encode()[:15]
        )
        return cls(_bpf(BPF_MAP_CREATE, attr, f"create ring buffer {name}"))

    def close(self) -> None:
        for m in (getattr(self, "_consumer", None), getattr(self, "_data", None)):
            if m is not None and not m.closed:
                m.close()
        super().close()

    def wait(self, timeout: float) -> None:
        """Until the kernel says there is data, or `timeout` seconds."""
        import select

        p = select.poll()
        p.register(self.fd, select.POLLIN)
        p.poll(max(0, int(timeout * 1000)))

    def drain(self, limit: int = 4096) -> list[bytes]:
        """The records written since the last drain (at most `limit`), consumed."""
        out: list[bytes] = []
        page = mmap.PAGESIZE
        cons = int.from_bytes(self._consumer[:8], "little")
        prod = int.from_bytes(self._data[:8], "little")
        mask = self.size - 1
        while cons < prod and len(out) < limit:
            at = page + (cons & mask)
            head = int.from_bytes(self._data[at : at + 4], "little")
            if head & self.BUSY:
                break
            length = head & ~(self.BUSY | self.DISCARD)
            if not head & self.DISCARD:
                out.append(self._data[at + self.HEADER : at + self.HEADER + length])
            cons += (length + self.HEADER + 7) & ~7
            self._consumer[:8] = cons.to_bytes(8, "little")
        return out


class Program(Fd):
    @classmethod
    def from_pin(cls, path: str, readonly: bool = False) -> Program:
        return cls(obj_get(path, readonly))

    @classmethod
    def load_sk_lookup(cls, insns: bytes, name: str) -> Program:
        """BPF_PROG_LOAD an sk_lookup program; on failure the verifier's log is in the error."""
        code = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(b"GPL")
        attr = _ProgLoadAttr(
            prog_type=BPF_PROG_TYPE_SK_LOOKUP,
            insn_cnt=len(insns) // 8,
            insns=ctypes.addressof(code),
            license=ctypes.addressof(lic),
            prog_name=name.encode()[:15],
            expected_attach_type=BPF_SK_LOOKUP,
        )
        try:
            return cls(_bpf(BPF_PROG_LOAD, attr, "load program"))
        except BpfError:
            pass
        log = ctypes.create_string_buffer(1 << 20)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return cls(_bpf(BPF_PROG_LOAD, attr, "load program"))
        except BpfError as e:
            e.log = log.value.decode(errors="replace")
            raise

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        return cls(_bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"open program {prog_id}"))

    def info(self) -> ProgInfo:
        return _get_info(self.fd, ProgInfo())

    def map_ids(self) -> list[int]:
        """Ids of the maps the program uses."""
        n = int(self.info().nr_map_ids)
        ids = (ctypes.c_uint32 * max(n, 1))()
        info = ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
        _get_info(self.fd, info)
        return list(ids[: min(n, int(info.nr_map_ids))])

    def test_run(self, ctx: ctypes.Structure, repeat: int = 1) -> tuple[int, int, bytes]:
        """BPF_PROG_TEST_RUN with `ctx` as context: (return value, ns per run, ctx out)."""
        out = (ctypes.c_uint8 * ctypes.sizeof(ctx))()
        attr = _TestRunAttr(
            prog_fd=self.fd,
            repeat=repeat,
            ctx_size_in=ctypes.sizeof(ctx),
            ctx_in=ctypes.addressof(ctx),
            ctx_size_out=ctypes.sizeof(out),
            ctx_out=ctypes.addressof(out),
        )
        _bpf(BPF_PROG_TEST_RUN, attr, "test run")
        return attr.retval, attr.duration, bytes(out)


class Link(Fd):
    """A bpf_link. Closing it while unpinned detaches it."""

    @classmethod
    def create_netns(cls, prog: Program, netns_fd: int) -> Link:
        attr = _LinkCreateAttr(prog_fd=prog.fd, target_fd=netns_fd, attach_type=BPF_SK_LOOKUP)
        return cls(_bpf(BPF_LINK_CREATE, attr, "attach to netns"))

    @classmethod
    def from_pin(cls, path: str) -> Link:
        return cls(obj_get(path))

    @classmethod
    def from_id(cls, link_id: int) -> Link:
        return cls(_bpf(BPF_LINK_GET_FD_BY_ID, _IdAttr(id=link_id), f"open link {link_id}"))

    @classmethod
    def running(cls, prog_ids: set[int]) -> Link | None:
        """The netns link that runs one of `prog_ids`, found by id rather than by its pin (the
        kernel hands out link fds from pins read-write only): a reader's way to the link. One
        that runs in a namespace is preferred to a detached one."""
        found: Link | None = None
        for link_id in link_ids():
            try:
                link = cls.from_id(link_id)
            except BpfError:
                continue  # gone meanwhile
            info = link.info()
            ours = info.type == BPF_LINK_TYPE_NETNS and info.prog_id in prog_ids
            if ours and (found is None or (info.netns_ino and not found.info().netns_ino)):
                if found is not None:
                    found.close()
                found = link
                continue
            link.close()
        return found

    def info(self) -> LinkInfo:
        return _get_info(self.fd, LinkInfo())

    def detach(self) -> None:
        _bpf(BPF_LINK_DETACH, _IdAttr(id=self.fd), "detach link")

    def update(self, new: Program, old: Program) -> None:
        """Swap the link's program for `new` in one step; fails if it no longer runs `old`."""
        attr = _LinkUpdateAttr(
            link_fd=self.fd, new_prog_fd=new.fd, flags=BPF_F_REPLACE, old_prog_fd=old.fd
        )
        _bpf(BPF_LINK_UPDATE, attr, "update link")


def possible_cpus() -> int:
    """Number of possible CPUs: per-CPU maps hold one value for each."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def _ids(cmd: int, what: str) -> Iterator[int]:
    cur = 0
    while True:
        attr = _IdAttr(id=cur)
        try:
            _bpf(cmd, attr, f"list {what}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        cur = attr.next_id
        yield cur


def link_ids() -> Iterator[int]:
    """Ids of every bpf_link on the machine."""
    return _ids(BPF_LINK_GET_NEXT_ID, "links")


def prog_ids() -> Iterator[int]:
    """Ids of every BPF program on the machine."""
    return _ids(BPF_PROG_GET_NEXT_ID, "programs")


def map_ids() -> Iterator[int]:
    """Ids of every BPF map on the machine."""
    return _ids(BPF_MAP_GET_NEXT_ID, "maps")


def map_from_id(map_id: int) -> Map[Any, Any]:
    fd = _bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id), f"open map {map_id}")
    return Map(fd, ctypes.c_uint32, ctypes.c_uint64)


def query_netns_programs(netns_fd: int) -> list[int]:
    """Ids of the sk_lookup programs attached to a netns, in run order."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(
        target_fd=netns_fd, attach_type=BPF_SK_LOOKUP, prog_ids=ctypes.addressof(ids), prog_cnt=64
    )
    _bpf(BPF_PROG_QUERY, attr, "query netns programs")
    return list(ids[: attr.prog_cnt])


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def is_bpffs(path: str) -> bool:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return bool((buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


def give_back_memory() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim). A large rule set
    is read and compiled through many short-lived objects; what they freed would otherwise
    stay in this process's resident memory until it exits."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3


def keep_heap_small(rules: int = 0) -> None:
    """Have glibc's malloc give every allocation of 1 MiB or more its own mapping, returned
    when freed (its default threshold is 128 KiB until the first such free: then it rises, up
    to 32 MiB, and freed memory is kept). Large rule sets make many arrays of that size, one
    after another. For `rules` rules (known once the file is read), more than 262,144 of
    them, the threshold is 16 bytes a rule: the arrays of a few bytes a rule are then reused
    from the heap rather than mapped (and their pages faulted in) each time, which at a
    million rules saves a second; below that the few MB it would cost count more."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        per_rule = 16 * rules
        mallopt(_M_MMAP_THRESHOLD, min(32 << 20, per_rule if per_rule >= 4 << 20 else 1 << 20))
