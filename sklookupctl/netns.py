"""Network namespaces and AnyIP addresses, through pyroute2.

A target namespace is named (a file under /run/netns), given as a path (/proc/PID/ns/net), or
the caller's own. It is never created by accident: only `create()` makes one.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from . import validate
from .errors import InvalidArgument, NotFound, SklookupError, denied
from .rules import IPNetwork

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703
SO_NETNS_COOKIE = 71
RT_TABLE_LOCAL = 255

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Netns:
    """An open network namespace. Owns `fd`."""

    spec: str  # as the user gave it ("" for the caller's own)
    path: str
    fd: int
    inode: int

    @property
    def label(self) -> str:
        return self.spec or "the caller's netns"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cookie(self) -> int:
        """The netns cookie: unlike the inode, never reused after the namespace is gone."""
        with enter(self), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def path_of(spec: str | None) -> str:
    if spec is None:
        return "/proc/thread-self/ns/net"
    if not spec:
        # "" would otherwise mean the caller's own namespace: a script's empty variable must
        # not steer the host
        raise InvalidArgument("the netns is empty", validate.NETNS_HINT)
    if "/" in spec:
        return spec
    if spec in (".", "..") or len(spec) > 255 or not spec.isprintable():
        raise InvalidArgument(f"netns name {validate.show(spec)} is not valid", validate.NETNS_HINT)
    return os.path.join(NETNS_RUN_DIR, spec)


def open_netns(spec: str | None) -> Netns:
    """Open the namespace named or located by `spec` (None: the caller's). A path that is not
    a namespace file (a FIFO, a directory) is refused without blocking on it."""
    path = path_of(spec)
    fd = validate.netns_file(path, spec or path)
    st = os.fstat(fd)
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        nstype = -1
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise InvalidArgument(
            f"{validate.show(path)} is not a network namespace", validate.NETNS_HINT
        )
    return Netns(spec or "", path, fd, st.st_ino)


_own_fd: int | None = None


def _own() -> int:
    global _own_fd
    if _own_fd is None:
        _own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return _own_fd


def _restore_own() -> None:
    if _own_fd is not None and _libc.setns(_own_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")


@contextlib.contextmanager
def enter(ns: Netns) -> Iterator[None]:
    """Run the block with this thread in `ns`. Sockets made inside stay in `ns`."""
    _own()
    if _libc.setns(ns.fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == 1:
            raise denied(f"cannot enter network namespace {ns.label}")
        raise OSError(err, os.strerror(err), ns.path)
    try:
        yield
    finally:
        _restore_own()


# -- named namespaces -----------------------------------------------------------------------


def list_named() -> list[dict[str, object]]:
    out = []
    names = sorted(os.listdir(NETNS_RUN_DIR)) if os.path.isdir(NETNS_RUN_DIR) else []
    for name in names:
        try:
            ino = os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino
        except OSError:
            continue
        out.append({"name": name, "inode": ino})
    return out


def _check_name(name: str) -> None:
    validate.netns_name(name)


def create(name: str) -> bool:
    """Create a named namespace with lo up. False if it already existed (lo is brought up)."""
    from pyroute2 import IPRoute, netns

    _check_name(name)
    created = not os.path.exists(os.path.join(NETNS_RUN_DIR, name))
    if created:
        netns.create(name)
    with open_netns(name) as ns, enter(ns), IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return created


def delete(name: str) -> None:
    from pyroute2 import netns

    _check_name(name)
    if not os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
        raise NotFound(f"network namespace {name!r} does not exist", "see `sklookupctl netns list`")
    netns.remove(name)


# -- AnyIP addresses: local routes on lo ----------------------------------------------------


def _route_args(prefix: IPNetwork, lo_index: int) -> dict[str, object]:
    return {
        "dst": str(prefix.network_address),
        "dst_len": prefix.prefixlen,
        "family": socket.AF_INET if prefix.version == 4 else socket.AF_INET6,
        "type": "local",
        "scope": "host",
        "table": RT_TABLE_LOCAL,
        "oif": lo_index,
        "proto": "static",
    }


def _lo(ipr: object) -> int:
    return int(ipr.link_lookup(ifname="lo")[0])  # type: ignore[attr-defined]


def addr_add(ns: Netns, prefix: IPNetwork) -> bool:
    """Make every address of `prefix` local to `ns` (AnyIP). False if it already was."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with enter(ns), IPRoute() as ipr:
        lo = _lo(ipr)
        ipr.link("set", index=lo, state="up")
        try:
            ipr.route("add", **_route_args(prefix, lo))
        except NetlinkError as e:
            if e.code == 17:  # EEXIST
                return False
            raise SklookupError(f"cannot add {prefix} in {ns.label}: {e}") from None
    return True


def addr_del(ns: Netns, prefix: IPNetwork) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with enter(ns), IPRoute() as ipr:
        try:
            ipr.route("del", **_route_args(prefix, _lo(ipr)))
        except NetlinkError as e:
            if e.code in (3, 2):  # ESRCH, ENOENT
                raise NotFound(
                    f"{prefix} is not an AnyIP prefix in {ns.label}",
                    "see `sklookupctl addr list`",
                ) from None
            raise SklookupError(f"cannot delete {prefix} in {ns.label}: {e}") from None


def addr_list(ns: Netns) -> list[IPNetwork]:
    """AnyIP prefixes: local routes on lo that the kernel did not make for an address."""
    from pyroute2 import IPRoute

    out: list[IPNetwork] = []
    with enter(ns), IPRoute() as ipr:
        lo = _lo(ipr)
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, table=RT_TABLE_LOCAL):
                if r.get("type") != 2 or r.get("proto") == 2:  # RTN_LOCAL, not RTPROT_KERNEL
                    continue
                if r.get_attr("RTA_OIF") != lo:
                    continue
                # a route of the whole family (/0) has no RTA_DST
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                out.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}"))
    return sorted(out, key=lambda n: (n.version, n))


# -- which namespaces are alive ---------------------------------------------------------------


def _ns_links() -> Iterator[tuple[str, str]]:
    """(path, readlink text) of every place a network namespace may be held: named ones,
    other nsfs mounts, processes' and threads' namespaces, and open fds."""
    if os.path.isdir(NETNS_RUN_DIR):
        for name in os.listdir(NETNS_RUN_DIR):
            path = os.path.join(NETNS_RUN_DIR, name)
            with contextlib.suppress(OSError):
                yield path, f"net:[{os.stat(path).st_ino}]"
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[3].startswith("net:["):
                yield parts[4], parts[3]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                path = f"/proc/{pid}/task/{tid}/ns/net"
                with contextlib.suppress(OSError):
                    yield path, os.readlink(path)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                path = f"/proc/{pid}/fd/{fd}"
                with contextlib.suppress(OSError):
                    link = os.readlink(path)
                    if link.startswith("net:["):
                        yield path, link


def find_cookie(cookie: int) -> str | None:
    """A path to the live network namespace with this cookie, None when there is none (for
    state whose inode is not known any more)."""
    seen: set[str] = set()
    for path, link in _ns_links():
        if link in seen:
            continue
        seen.add(link)
        try:
            with open_netns(path) as ns:
                if ns.cookie() == cookie:
                    return path
        except (SklookupError, OSError):
            seen.discard(link)  # gone while we looked: another path may still hold it
    return None


def find_alive(inode: int, cookie: int) -> str | None:
    """A path to the network namespace with this inode and cookie, None when it is gone (the
    inode alone may have been reused by a newer namespace: the cookie never is)."""
    want = f"net:[{inode}]"
    for path, link in _ns_links():
        if link != want:
            continue
        try:
            with open_netns(path) as ns:
                # one inode is one namespace at a time: this one, or a newer one that reuses it
                return path if ns.cookie() == cookie else None
        except (SklookupError, OSError):
            continue  # gone while we looked: another path may still hold it
    return None
