"""Run an sk_lookup program on a made-up lookup with BPF_PROG_TEST_RUN (no packet, no netns).

Used by the differential tests and the benchmark: the kernel runs the real program on a
`struct bpf_sk_lookup` we fill in, and hands back the verdict and the selected socket's cookie.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass

from .bpfsys import Program
from .rules import PROTOCOLS, IPAddress

SK_DROP = 0
SK_PASS = 1


class LookupCtx(ctypes.Structure):
    """struct bpf_sk_lookup (72 bytes): cookie@0 family@8 protocol@12 remote_ip4@16
    remote_ip6@20 remote_port@36 local_ip4@40 local_ip6@44 local_port@60 ingress_ifindex@64"""

    _fields_ = [("raw", ctypes.c_uint8 * 72)]


def lookup_ctx(
    proto: str, addr: IPAddress, port: int, remote: str = "", remote_port: int = 40000
) -> LookupCtx:
    """A lookup for a packet to addr:port (from `remote`, a documentation address by default)."""
    b = bytearray(72)
    v6 = addr.version == 6
    struct.pack_into("<II", b, 8, socket.AF_INET6 if v6 else socket.AF_INET, PROTOCOLS[proto])
    peer = ipaddress.ip_address(remote or ("2001:db8:ffff::1" if v6 else "203.0.113.254"))
    if v6:
        b[20:36] = peer.packed
        b[44:60] = addr.packed
    else:
        b[16:20] = peer.packed
        b[40:44] = addr.packed
    struct.pack_into(">H", b, 36, remote_port)
    struct.pack_into("<I", b, 60, port)
    ctx = LookupCtx()
    ctypes.memmove(ctypes.addressof(ctx), bytes(b), 72)
    return ctx


@dataclass
class Outcome:
    verdict: int  # SK_PASS or SK_DROP
    cookie: int  # of the selected socket; 0: none (the normal lookup goes on)
    ns: int  # mean nanoseconds per run

    @property
    def steered(self) -> bool:
        return self.verdict == SK_PASS and self.cookie != 0


def run(prog: Program, ctx: LookupCtx, repeat: int = 1) -> Outcome:
    verdict, ns, out = prog.test_run(ctx, repeat)
    return Outcome(verdict, struct.unpack_from("<Q", out, 0)[0], ns)
