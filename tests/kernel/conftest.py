"""Kernel tests: real kernel, real sockets, each test in network namespaces of its own.

Every test gets a fresh netns with 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 and
2001:db8::/64 as AnyIP,
and the whole session uses a private bpffs mount, so nothing touches the machine's root netns
or /sys/fs/bpf. Namespaces, pins and processes are removed also when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sklookupctl import api, bpfsys, echo
from sklookupctl import netns as nsmod
from sklookupctl.cli import cli

PREFIXES = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/64")
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "sklookupctl")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kernel" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def _need_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("SKLOOKUPCTL_KERNEL_TESTS") == "required":
        pytest.fail("kernel tests are required here but this is not root")
    pytest.skip("kernel tests need root (run scripts/test as root)")


@contextlib.contextmanager
def private_bpffs(prefix: str = "sklt-bpffs-", mode: int = 0o700) -> Iterator[str]:
    """A bpffs instance of its own in a new directory under /tmp: unmounting it drops every
    pin made in it."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, mode)
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False)
        os.rmdir(path)


@pytest.fixture(scope="session")
def bpffs() -> Iterator[str]:
    """The session's private bpffs."""
    with private_bpffs() as path:
        yield path


@dataclass
class Proxy:
    pid: int
    tcp_fd: int | None
    udp_fd: int | None
    port: int
    proc: subprocess.Popen[str]
    ready: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@dataclass
class NS:
    """A throwaway namespace and helpers to act in it."""

    name: str
    bpffs: str
    procs: list[Proxy] = field(default_factory=list)

    @property
    def path(self) -> str:
        return nsmod.path_of(self.name)

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(cli, ["--netns", self.name, "--bpffs", self.bpffs, *args])

    def ok(self, *args: str) -> Result:
        res = self.cli(*args)
        assert res.exit_code == 0, f"{args}: {res.output}"
        return res

    def status(self) -> dict[str, object]:
        res = self.ok("status", "--json")
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def proxy(
        self,
        tcp: str | None = None,
        udp: str | None = None,
        v6only: bool = False,
        tag: str = "",
        extra: tuple[str, ...] = (),
    ) -> Proxy:
        """Start an echo server in this netns (a process of its own)."""
        cmd = [sys.executable, "-m", "sklookupctl.echo", "--netns", self.path, "--lifetime", "300"]
        if tcp:
            cmd += ["--tcp", tcp]
        if udp:
            cmd += ["--udp", udp]
        if v6only:
            cmd.append("--v6only")
        if tag:
            cmd += ["--tag", tag]
        cmd += extra
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        p = Proxy(
            ready["pid"],
            ready.get("tcp_fd"),
            ready.get("udp_fd"),
            ready.get("tcp_port") or ready.get("udp_port"),
            proc,
            ready,
        )
        self.procs.append(p)
        return p

    def dial(self, proto: str, host: str, port: int, payload: bytes = b"") -> str:
        """Dial from inside the netns: 'ADDR PORT' the server saw, 'refused' or 'timeout'."""
        with nsmod.open_netns(self.name) as ns, nsmod.enter(ns):
            if proto == "tcp":
                return echo.dial_tcp(host, port, payload=payload)
            return echo.dial_udp(host, port)

    def look(self, proto: str, host: str, port: int) -> str:
        """One lookup by the live program (BPF_PROG_TEST_RUN, counted in its live maps, as a
        packet's would be): "steer", "drop" or "pass". Exactly one lookup each, where a real
        connection may make more (a segment that arrives after its socket is gone is looked
        up again), so counters can be checked exactly."""
        from sklookupctl import testrun

        st = self.status()
        if not st["loaded"]:
            return "pass"  # no program: nothing decides, nothing counts
        prog_id = int(str(st["program_id"]))
        with bpfsys.Program.from_id(prog_id) as prog:
            out = testrun.run(prog, testrun.lookup_ctx(proto, ipaddress.ip_address(host), port))
        if out.steered:
            return "steer"
        return "drop" if out.verdict == testrun.SK_DROP else "pass"

    def script_argv(self, *args: str) -> list[str]:
        """The installed console script, aimed at this netns and the test bpffs."""
        return [CONSOLE_SCRIPT, "--netns", self.name, "--bpffs", self.bpffs, *args]

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the installed console script in a process of its own."""
        return subprocess.run(self.script_argv(*args), capture_output=True, text=True, timeout=60)

    def files(self) -> list[str]:
        """Everything sklookupctl has pinned under the test bpffs."""
        out = []
        top = os.path.join(self.bpffs, "sklookupctl")
        for root, dirs, files in os.walk(top):
            out += [os.path.join(root, d) for d in dirs] + [os.path.join(root, f) for f in files]
        lock = os.path.join(top, "lock")  # the lock and its turnstile stay
        return sorted(p for p in out if p != lock and not p.startswith(lock + "/"))


MADE: set[str] = set()  # namespaces this session made (another test run may have its own)


@contextlib.contextmanager
def throwaway(bpffs: str, prefixes: tuple[str, ...]) -> Iterator[NS]:
    """A new netns with lo up and `prefixes` as AnyIP; removed with its processes and pins."""
    name = f"sklt-{uuid.uuid4().hex[:10]}"
    MADE.add(name)
    api.netns_add(name)
    n = NS(name, bpffs)
    try:
        for p in prefixes:
            api.addr_add(name, p)
        yield n
    finally:
        for p in n.procs:
            p.stop()
        api.netns_del(name, bpffs=bpffs)


@pytest.fixture
def ns(bpffs: str) -> Iterator[NS]:
    with throwaway(bpffs, PREFIXES) as n:
        yield n


@pytest.fixture
def ns2(bpffs: str) -> Iterator[NS]:
    """A second namespace, for cross-namespace cases."""
    with throwaway(bpffs, ()) as n:
        yield n


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers(bpffs: str) -> Iterator[None]:
    yield
    left = (
        [n for n in os.listdir(nsmod.NETNS_RUN_DIR) if n in MADE]
        if os.path.isdir(nsmod.NETNS_RUN_DIR)
        else []
    )
    for n in left:
        api.netns_del(n, bpffs=bpffs)
    assert not left, f"tests left namespaces behind: {left}"


# -- kernel objects: everything sklookupctl made is pinned, or gone ----------------------------


@dataclass(frozen=True)
class Objects:
    """sklookupctl's BPF objects (by id): programs, maps and links."""

    progs: frozenset[int]
    maps: frozenset[int]
    links: frozenset[int]

    def since(self, base: Objects) -> Objects:
        return Objects(
            frozenset(i for i in self.progs if i > max(base.progs, default=0)),
            frozenset(i for i in self.maps if i > max(base.maps, default=0)),
            frozenset(i for i in self.links if i > max(base.links, default=0)),
        )


def kernel_objects() -> Objects:
    """Every program named skl_dispatch, map named skl_*, and link running one of those
    programs (a detached link still holds its program)."""
    progs, maps, links = set(), set(), set()
    for pid in bpfsys.prog_ids():
        with contextlib.suppress(OSError), bpfsys.Program.from_id(pid) as p:
            if p.info().name == b"skl_dispatch":
                progs.add(pid)
    for mid in bpfsys.map_ids():
        with contextlib.suppress(OSError), bpfsys.map_from_id(mid) as m:
            if m.info().name.startswith(b"skl_"):
                maps.add(mid)
    for lid in bpfsys.link_ids():
        with contextlib.suppress(OSError), bpfsys.Link.from_id(lid) as link:
            if link.info().prog_id in progs:
                links.add(lid)
    return Objects(frozenset(progs), frozenset(maps), frozenset(links))


def _bpffs_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == "bpf"]


def pinned_objects(bpffs: str) -> Objects:
    """The objects pinned under <bpffs>/sklookupctl, and under that of every other bpffs
    mount (another sklookupctl on the machine pins its own objects there)."""
    progs, maps, links = set(), set(), set()
    roots = {bpffs, *_bpffs_mounts()}
    walked = [w for r in sorted(roots) for w in os.walk(os.path.join(r, "sklookupctl"))]
    for root, _dirs, files in walked:
        for f in files:
            path = os.path.join(root, f)
            with contextlib.suppress(OSError):
                if f == "program":
                    with bpfsys.Program.from_pin(path) as p:
                        progs.add(p.info().id)
                elif f == "link":
                    with bpfsys.Link.from_pin(path) as link:
                        links.add(link.info().id)
                else:
                    with bpfsys.Map.from_pin(path, ctypes.c_uint32, ctypes.c_uint64) as m:
                        maps.add(m.info().id)
    return Objects(frozenset(progs), frozenset(maps), frozenset(links))


def assert_no_leaks(bpffs: str, base: Objects, wait: float = 5.0) -> None:
    """Every program, map and link sklookupctl made since `base` is pinned (the kernel frees
    unpinned ones a moment later: wait for it)."""
    deadline = time.monotonic() + wait
    while True:
        gc.collect()  # library objects dropped without close() would hold fds
        made = kernel_objects().since(base)
        pinned = pinned_objects(bpffs).since(base)
        if made == pinned or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert made == pinned, f"made {made}, pinned {pinned}"


def machine_settings(examples: int, steps: int) -> Any:
    """hypothesis settings of the kernel's state machines: bounded, no deadline (the kernel
    takes its time), the same examples every run unless SKLOOKUPCTL_MODEL_RANDOM is set."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not os.environ.get("SKLOOKUPCTL_MODEL_RANDOM"),
    )


__all__ = [
    "MADE",
    "NS",
    "Objects",
    "Proxy",
    "assert_no_leaks",
    "kernel_objects",
    "machine_settings",
    "throwaway",
]
