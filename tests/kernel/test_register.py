"""Targets that wait for their socket (`--allow-missing`), and `register` (issue 9, items 1 and
2): from the declared address, --to, --pid/--fd, and systemd socket activation simulated as
systemd does it (the socket at fd 3, LISTEN_FDS, LISTEN_PID = the exec'd pid, LISTEN_FDNAMES),
with the socket held by "systemd" (this process) across proxy restarts."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner

from sklookupctl import netns as nsmod
from sklookupctl.cli import cli

from .conftest import MADE, NS

FILE = """\
[targets.web]
to = "127.0.0.1:9000"

[[rules]]
protocol = "tcp"
prefix = "192.0.2.0/24"
ports = "all"
target = "web"
"""


def target(ns: NS, name: str) -> dict[str, object]:
    (t,) = [t for t in ns.status()["targets"] if t["name"] == name]  # type: ignore[union-attr, index]
    return t  # type: ignore[no-any-return]


def test_a_file_loads_before_its_proxy_and_register_fills_it(ns: NS, tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text(FILE)
    res = ns.cli("apply", str(f))
    assert res.exit_code == 1 and "no tcp socket" in res.output and ns.files() == []
    res = ns.ok("apply", "--allow-missing", str(f))
    assert "target web: " in res.output and "waits for its socket" in res.output
    assert target(ns, "web")["socket"] == "waiting"
    assert "waiting" in ns.ok("status").stdout
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"  # on_missing drop meanwhile
    # applying the same file again, still without a proxy, changes nothing
    assert (
        json.loads(ns.ok("apply", "--allow-missing", "--json", str(f)).stdout)["changed"] is False
    )
    assert ns.cli("register", "web").exit_code == 1  # nothing listens yet: an error
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    doc = json.loads(ns.ok("register", "web", "--json").stdout)
    assert doc["command"] == "register" and doc["changed"] is True and doc["source"] == "address"
    assert target(ns, "web")["socket"] == "live"
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    assert json.loads(ns.ok("register", "web", "--json").stdout)["changed"] is False


def test_attach_allow_missing_and_on_missing_pass(ns: NS) -> None:
    normal = ns.proxy(tcp="0.0.0.0:80", tag="normal")  # what the normal lookup finds
    res = ns.ok(
        "attach", "tcp", "192.0.2.0/24", "80", "--to", "127.0.0.1:9000", "--name", "web",
        "--allow-missing", "--on-missing", "pass",
    )  # fmt: skip
    assert "waits for its socket" in res.output
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 normal"
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("register", "web")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    normal.stop()


def test_register_from_elsewhere_and_its_errors(ns: NS) -> None:
    assert ns.cli("register", "web").exit_code == 1  # no dispatcher, no target
    ns.proxy(tcp="127.0.0.1:9000", tag="a")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000", "--name", "web")
    res = ns.cli("register", "nosuch")
    assert res.exit_code == 1 and "no target 'nosuch'" in res.output
    b = ns.proxy(tcp="127.0.0.1:9001", tag="b")
    ns.ok("register", "web", "--to", "127.0.0.1:9001")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 b"
    c = ns.proxy(tcp="127.0.0.1:9002", tag="c")
    assert c.tcp_fd is not None
    doc = json.loads(
        ns.ok("register", "web", "--pid", str(c.pid), "--fd", str(c.tcp_fd), "--json").stdout
    )
    assert doc["source"] == "fd" and doc["sockets"][0]["address"] == "127.0.0.1:9002"
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 c"
    assert ns.cli("register", "web", "--fd-name", "web").exit_code == 1  # no systemd here
    b.stop()


@contextlib.contextmanager
def listening(ns: NS, addr: str, port: int) -> Iterator[socket.socket]:
    """A listening socket in the namespace, held by this process (as systemd holds a .socket
    unit's socket)."""
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    try:
        yield s
    finally:
        s.close()


def activated(
    ns: NS, sock: socket.socket, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """Run the command as systemd starts a service with Sockets=: the socket at fd 3,
    LISTEN_PID the pid of the exec'd command."""
    fd = sock.fileno()

    def child() -> None:
        os.dup2(fd, 3)
        os.environ["LISTEN_PID"] = str(os.getpid())
        for k, v in env.items():
            os.environ[k] = v

    return subprocess.run(
        ns.script_argv(*args),
        pass_fds=(fd, 3),
        preexec_fn=child,
        capture_output=True,
        text=True,
        timeout=60,
    )


PROXY = (
    "import socket, sys\n"
    "s = socket.socket(fileno=3)\n"
    "c, _ = s.accept()\n"
    "c.sendall(sys.argv[1].encode())\n"
    "c.close()\n"
)


def serve_once(sock: socket.socket, tag: str) -> subprocess.Popen[str]:
    """A proxy started by systemd: the socket at fd 3; it answers one connection and exits."""
    fd = sock.fileno()
    return subprocess.Popen(
        [sys.executable, "-c", PROXY, tag],
        pass_fds=(fd, 3),
        preexec_fn=lambda: os.dup2(fd, 3),
        text=True,
    )


def dial(ns: NS, host: str, port: int) -> str:
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        try:
            with socket.create_connection((host, port), timeout=10) as c:
                return c.recv(100).decode()
        except OSError as e:
            return f"error: {e}"


def test_socket_activation_keeps_steering_across_proxy_restarts(ns: NS) -> None:
    ns.ok(
        "attach",
        "tcp",
        "192.0.2.0/24",
        "all",
        "--to",
        "127.0.0.1:9000",
        "--name",
        "web",
        "--allow-missing",
    )
    with listening(ns, "127.0.0.1", 9000) as sock:
        env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
        res = activated(ns, sock, env, "register", "web", "--fd-name", "web", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["source"] == "systemd" and doc["changed"] is True
        # LISTEN_PID of another process: not for this one, so the declared address is used
        out = activated(ns, sock, {**env, "LISTEN_PID": "1"}, "register", "web", "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["source"] == "address" and doc["changed"] is False  # the same socket
        # proxies come and go; the socket (held by "systemd") stays, and so does steering
        results: list[str] = []
        for tag in ("first", "second", "third"):
            proxy = serve_once(sock, tag)
            results.append(dial(ns, "192.0.2.7", 443))
            proxy.wait(timeout=30)
        # and with no proxy running at all, a connection waits in the backlog for the next
        t = threading.Thread(target=lambda: results.append(dial(ns, "192.0.2.8", 80)))
        t.start()
        t.join(0.5)
        proxy = serve_once(sock, "fourth")
        t.join(30)
        proxy.wait(timeout=30)
        assert results == ["first", "second", "third", "fourth"]
        assert target(ns, "web")["socket"] == "live"
    assert target(ns, "web")["socket"] == "missing"  # "systemd" closed it


def test_one_file_restores_the_namespace_its_addresses_and_rules(ns: NS, tmp_path: Path) -> None:
    # what a boot restore does: the namespace may not exist yet, nor its AnyIP prefixes
    from sklookupctl import api

    name = f"{ns.name}-r"
    MADE.add(name)
    f = tmp_path / "restore.toml"
    f.write_text('[netns]\ncreate = true\naddresses = ["192.0.2.0/24", "2001:db8::/64"]\n\n' + FILE)
    try:
        cmd = ["--netns", name, "--bpffs", ns.bpffs]
        dry = CliRunner().invoke(
            cli, [*cmd, "apply", "--dry-run", "--allow-missing", "--json", str(f)]
        )
        assert dry.exit_code == 0, dry.output
        assert json.loads(dry.stdout)["changed"] is True and not os.path.exists(
            f"/run/netns/{name}"
        )
        res = CliRunner().invoke(cli, [*cmd, "apply", "--allow-missing", "--exit-code", str(f)])
        assert res.exit_code == 5, res.output
        assert f"created network namespace {name}" in res.output
        assert api.addr_list(name) == ["192.0.2.0/24", "2001:db8::/64"]
        again = CliRunner().invoke(cli, [*cmd, "apply", "--allow-missing", "--exit-code", str(f)])
        assert again.exit_code == 0, again.output  # nothing to do the second time
        exported = CliRunner().invoke(cli, [*cmd, "export"]).stdout
        assert 'addresses = ["192.0.2.0/24", "2001:db8::/64"]' in exported
        assert "generation" not in exported  # a file kept in git changes only with the rules
    finally:
        CliRunner().invoke(cli, ["--bpffs", ns.bpffs, "netns", "del", name])


def test_a_refused_restore_leaves_no_namespace_and_its_dry_run_says_so(
    ns: NS, tmp_path: Path
) -> None:
    name = f"{ns.name}-x"
    MADE.add(name)
    f = tmp_path / "restore.toml"
    f.write_text('[netns]\ncreate = true\naddresses = ["192.0.2.0/24"]\n\n' + FILE)
    cmd = ["--netns", name, "--bpffs", ns.bpffs]
    try:
        for flags in (["--dry-run"], []):
            res = CliRunner().invoke(cli, [*cmd, "apply", *flags, str(f)])
            assert res.exit_code == 1 and "targets.web.to" in res.output, res.output
            assert not os.path.exists(f"/run/netns/{name}")  # nothing made, nothing left
        res = CliRunner().invoke(
            cli, [*cmd, "apply", "--dry-run", "--allow-missing", "--json", str(f)]
        )
        doc = json.loads(res.stdout)
        assert doc["changed"] is True and doc["loaded_dispatcher"] is True
        assert [t["name"] for t in doc["targets"]["added"]] == ["web"]
        assert doc["addresses_added"] == ["192.0.2.0/24"] and not os.path.exists(
            f"/run/netns/{name}"
        )
    finally:
        CliRunner().invoke(cli, ["--bpffs", ns.bpffs, "netns", "del", name])


def test_register_among_sockets_systemd_named_alike(ns: NS) -> None:
    # a .socket unit with two Listen lines passes both under one name
    ns.ok(
        "attach",
        "tcp",
        "192.0.2.0/24",
        "all",
        "--to",
        "127.0.0.1:9301",
        "--name",
        "dup",
        "--allow-missing",
    )
    with listening(ns, "127.0.0.1", 9301) as a, listening(ns, "127.0.0.1", 9302) as b:
        fa, fb = a.fileno(), b.fileno()

        def child() -> None:
            os.dup2(fa, 3)
            os.dup2(fb, 4)
            os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="dup:dup")

        out = subprocess.run(
            ns.script_argv("register", "dup", "--fd-name", "dup", "--json"),
            pass_fds=(fa, fb, 3, 4),
            preexec_fn=child,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["sockets"][0]["address"] == "127.0.0.1:9301"  # its own
        assert "127.0.0.1:9301" in ns.ok("export").stdout
