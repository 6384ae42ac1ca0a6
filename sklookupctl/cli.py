"""The sklookupctl command line: a thin layer over sklookupctl.api.

Noun commands read; verb commands change state. Library errors become one-line messages here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from typing import Any

import click

from . import __version__, api, compiler, errors, interrupts, notices, render, store, validate
from . import explain as explain_mod
from . import rules as rules_mod
from . import trace as trace_mod
from .bpfsys import BpfError
from .errors import CompileError, SklookupError
from .netns import open_netns

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
MESSAGE_MAX = 2000  # characters of an error line: a message quoting a huge input is cut

EXIT_CODES = """\b
Exit codes:
  0  success
  1  bad input, or a request refused (conflicting rule, socket not found, nothing loaded)
  2  usage: unknown option or command, missing argument
  3  needs privileges: run as root
  4  state or machine problem: lock busy, untrusted or foreign state, bpffs, BCC, kernel
  5  apply --exit-code: something changed (with --dry-run: would change)
 70  a bug in sklookupctl (the traceback is printed: please report it)
130  interrupted (Ctrl-C) before anything changed; 143: SIGTERM, the same
"""


class Obj:
    def __init__(self, netns: str | None, bpffs: str, wait: float) -> None:
        self.netns = netns
        self.bpffs = bpffs
        self.wait = wait


def _errno_code(e: OSError) -> tuple[int, str]:
    """Exit code and hint for a system call that failed where no hint was written."""
    if e.errno in (errno.EPERM, errno.EACCES):
        if os.geteuid() != 0:
            return errors.EXIT_PRIVILEGES, "run as root"
        return errors.EXIT_STATE, errors.ROOT_REFUSED
    return {
        errno.EMFILE: (errors.EXIT_STATE, "raise the limit of open files: ulimit -n"),
        errno.EROFS: (
            errors.EXIT_STATE,
            "the bpffs is mounted read-only: remount it read-write (mount -o remount,rw DIR)"
            if isinstance(e, BpfError)
            else "the file system is mounted read-only",
        ),
    }.get(e.errno or 0, (errors.EXIT_STATE, ""))


def _os_message(e: OSError) -> str:
    """A failed system call in words: `what: why`, not Python's `[Errno N] ...`."""
    if isinstance(e, BpfError):
        return str(e.strerror)  # "open pinned PATH: Read-only file system"
    what = e.filename if e.filename is not None else ""
    return f"{what}: {e.strerror}" if what else str(e.strerror or e)


def fail(code: int, message: str, hint: str = "", log: str = "", as_json: bool = False) -> None:
    """Report an error as one line on stderr (JSON with --json) and exit with `code`. The
    message is cleaned (render.clean) and cut, whatever it quotes."""
    message, hint = render.clean(message), render.clean(hint)
    # stderr that cannot be written (a full disk) loses the line, not the exit status
    with contextlib.suppress(OSError):
        if as_json:
            doc = {"error": message[:MESSAGE_MAX], "hint": hint[:MESSAGE_MAX], "exit_code": code}
            if log:
                doc["log"] = log
            click.echo(json.dumps(doc, sort_keys=True), err=True)
        else:
            text = message + (f" ({hint})" if hint else "")
            if len(text) > MESSAGE_MAX:
                text = text[: MESSAGE_MAX - 3] + "..."
            click.echo(f"error: {text}", err=True)
            if log:
                click.echo(log, err=True)
    sys.exit(code)


# The exit status of a command whose change was made but whose report could not be written
# (stdout on a full disk): 0, or what the command would have exited with after its report
# (apply --exit-code); None for a command whose output is what it is for (demo): it fails
_report_lost: list[int | None] = [0]


GLOBAL_OPTIONS = ("-n", "--netns", "--bpffs", "--wait", "--cache-dir")  # each takes a value


def _value_options(cmd: click.Command) -> set[str]:
    """The options of `cmd` (and of every command below it) that take a value."""
    out: set[str] = set()
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.is_flag:
            out.update(p.opts)
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            out |= _value_options(sub)
    return out


def hoist_globals(group: click.Group, argv: list[str]) -> list[str]:
    """Global options given after the command (`status -n edge`) moved before it, where click
    looks for them. A value of one of the command's own options, and everything after `--`,
    stays where it is."""
    i = 0
    while i < len(argv) and argv[i] not in group.commands:
        i += 1  # the global options and their values before the command
    if i >= len(argv):
        return argv
    takes_value = _value_options(group.commands[argv[i]])
    tail: list[str] = []
    moved: list[str] = []
    j = i + 1
    while j < len(argv):
        a = argv[j]
        name = a.split("=", 1)[0]
        if a == "--":
            tail += argv[j:]
            break
        if name in GLOBAL_OPTIONS or (a.startswith("-n") and len(a) > 2 and a[2] != "-"):
            if ("=" in a and a.startswith("--")) or (a.startswith("-n") and len(a) > 2):
                moved.append(a)
                j += 1
            else:
                moved += argv[j : j + 2]
                j += 2
            continue
        tail.append(a)
        if a in takes_value and j + 1 < len(argv):
            tail.append(argv[j + 1])
            j += 1
        j += 1
    # after those given before the command: given twice, the later one wins, as in click
    return argv[:i] + moved + [argv[i]] + tail


class Stopped(Exception):
    """Ctrl-C or SIGTERM during a command, past click's own handling (which prints an empty
    line first)."""

    def __init__(self, term: bool) -> None:
        super().__init__()
        self.term = term


class Group(click.Group):
    """The root command: every error becomes one line and an exit code (errors.py)."""

    def invoke(self, ctx: click.Context) -> Any:
        # before click's own handling, which would print an empty line first
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise Stopped(isinstance(e, errors.Terminated)) from None

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = hoist_globals(self, list(sys.argv[1:] if args is None else args))
        # --json as parsed; for a usage error (parsing stopped), as written
        written = "--json" in (argv[: argv.index("--")] if "--" in argv else argv)
        _json_given[0] = False
        changes = api.changes_made()
        _report_lost[0] = 0
        saved_cache = os.environ.get(compiler.CACHE_ENV)
        notices.set_sink(lambda text: click.echo(f"note: {render.clean(text)}", err=True))
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "sklookupctl"
            as_json = _json_given[0] or written
            fail(e.exit_code, e.format_message(), f"see {where} --help", as_json=as_json)
        except click.ClickException as e:  # click's own (a file it could not open, say)
            fail(errors.EXIT_REFUSED, e.format_message(), as_json=_json_given[0] or written)
        except (click.Abort, KeyboardInterrupt, Stopped) as e:
            # click makes a SIGTERM (errors.Terminated) that lands while it parses the
            # arguments, or closes its context, a click.Abort from it
            term = (isinstance(e, Stopped) and e.term) or any(
                isinstance(x, errors.Terminated) for x in (e, e.__cause__, e.__context__)
            )
            fail(
                errors.EXIT_TERMINATED if term else errors.EXIT_INTERRUPTED,
                f"{'terminated' if term else 'interrupted'}: nothing was changed",
                as_json=_json_given[0],
            )
        except errors.OutputFailed as e:
            if api.changes_made() == changes or _report_lost[0] is None:
                fail(e.exit_code, e.message, e.hint, as_json=_json_given[0])
            # the change happened: it is not reported as failed because its report was lost
            with contextlib.suppress(OSError):
                click.echo(f"note: the change was made, but {e.message}", err=True)
            rv = _report_lost[0]
        except CompileError as e:
            fail(e.exit_code, e.message, e.hint, log=e.log, as_json=_json_given[0])
        except SklookupError as e:
            fail(e.exit_code, e.message, e.hint, as_json=_json_given[0])
        except OSError as e:  # BpfError too
            code, hint = _errno_code(e)
            fail(code, _os_message(e), hint, as_json=_json_given[0])
        except Exception:
            import traceback

            traceback.print_exc()
            fail(
                errors.EXIT_INTERNAL,
                "sklookupctl failed unexpectedly (a bug: the traceback is above)",
                as_json=_json_given[0],
            )
        finally:
            notices.set_sink(None)
            if saved_cache is None:
                os.environ.pop(compiler.CACHE_ENV, None)
            else:
                os.environ[compiler.CACHE_ENV] = saved_cache
        sys.exit(rv if isinstance(rv, int) else 0)


class Number(click.ParamType[int]):
    """An integer in ASCII digits (click's int() would take ² and ٨٠), maybe negative, of at
    most 30 digits; the library checks its range (and says what it is)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        t = str(value).strip()
        body = t[1:] if t.startswith("-") else t
        if not body or not body.isascii() or not body.isdigit() or len(body) > 30:
            self.fail(f"{validate.show(str(value), 40)} is not a number", param, ctx)
        return int(t)


class Seconds(click.ParamType[float]):
    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return validate.seconds(str(value))
        except SklookupError as e:
            self.fail(f"{e.message} ({e.hint})", param, ctx)


_json_given = [False]  # set while parsing: errors after that are JSON too


def _note_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _json_given[0] = True
    return value


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_note_json,
    help="Print JSON instead of text (errors too: one object on stderr).",
)


@click.group(cls=Group, context_settings=CONTEXT, epilog=EXIT_CODES)
@click.option(
    "--netns",
    "-n",
    metavar="NS",
    envvar="SKLOOKUPCTL_NETNS",
    show_envvar=True,
    help="Target network namespace: a name under /run/netns or a path such as "
    "/proc/PID/ns/net. Default: the caller's own.",
)
@click.option(
    "--bpffs",
    envvar="SKLOOKUPCTL_BPFFS",
    show_envvar=True,
    default=api.DEFAULT_BPFFS,
    show_default=True,
    metavar="DIR",
    help="bpffs mount where the dispatcher's pins live (one directory per netns).",
)
@click.option(
    "--wait",
    envvar="SKLOOKUPCTL_WAIT",
    show_envvar=True,
    type=Seconds(),
    default=store.DEFAULT_WAIT,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for another sklookupctl command to finish (its lock) before giving "
    "up with exit code 4 and the other command's pid.",
)
@click.option(
    "--cache-dir",
    metavar="DIR",
    help=f"Cache of compiled programs (default: {compiler.ROOT_CACHE} for root, else "
    f"~/.cache/sklookupctl; also ${compiler.CACHE_ENV}). Used only when it and the "
    "directories above it are yours (or root's) and nobody else can write them.",
)
@click.version_option(__version__, prog_name="sklookupctl")
@click.pass_context
def cli(
    ctx: click.Context, netns: str | None, bpffs: str, wait: float, cache_dir: str | None
) -> None:
    """Steer connections for whole prefixes and port ranges to one socket (BPF sk_lookup).

    \b
    Typical runbook:
      sklookupctl netns add edge                     # or use an existing namespace
      sklookupctl -n edge addr add 192.0.2.0/24      # make the prefix local (AnyIP)
      sklookupctl -n edge attach tcp 192.0.2.0/24 all --to 127.0.0.1:8080
      sklookupctl -n edge status
      sklookupctl -n edge explain tcp 192.0.2.10 443 # why it goes where it goes
      sklookupctl doctor                             # what is wrong, and the fix

    Steering lives in bpffs and outlives this command. Run as root. Global options may also
    come after the command (`sklookupctl status -n edge`).
    """
    if cache_dir is not None:
        os.environ[compiler.CACHE_ENV] = cache_dir
    if netns is None and os.environ.get("SKLOOKUPCTL_NETNS") == "":
        # an empty variable must not mean the caller's own namespace (the host's)
        raise click.UsageError("SKLOOKUPCTL_NETNS is set but empty: unset it or name a netns")
    ctx.obj = Obj(netns, bpffs, wait)


@cli.command(context_settings=CONTEXT)
@click.argument("proto", metavar="PROTO")
@click.argument("prefix", metavar="PREFIX")
@click.argument("ports", metavar="PORTS")
@click.option(
    "--to",
    "to",
    metavar="ADDR:PORT",
    help="Steer to the socket listening (TCP) or bound (UDP) at this address in the "
    "target netns; a wildcard listener on the port also matches. IPv6: [::1]:80.",
)
@click.option(
    "--pid", type=Number(), metavar="PID", help="With --fd: steer to fd FD of process PID."
)
@click.option(
    "--fd", type=Number(), metavar="FD", help="With --pid: the socket's fd in that process."
)
@click.option("--drop", is_flag=True, help="Refuse matching connections and datagrams.")
@click.option(
    "--name",
    metavar="TARGET",
    help="Name of the target (default: PROTO-ADDR:PORT). Rules naming the same target "
    "share its socket; re-running attach re-registers a restarted proxy.",
)
@click.option(
    "--on-missing",
    type=click.Choice(["drop", "pass"]),
    default="drop",
    show_default=True,
    help="When the target's socket is gone: drop, or pass to the normal lookup.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Change an existing rule with the same PROTO PREFIX PORTS (or re-point TARGET).",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Load the rule even when nothing listens at --to yet: the target waits for its "
    "socket (status shows it waiting, its rules act as --on-missing says) until `register`, "
    "attach or apply finds one. For boot, before the proxies start.",
)
@click.option(
    "--no-reuseport",
    "exact",
    is_flag=True,
    help="Steer to exactly the socket found, not to its SO_REUSEPORT group (by default "
    "every member listening there is registered, the kernel picks one per connection, and "
    "steering goes on while any member lives).",
)
@json_option
@click.pass_obj
def attach(
    obj: Obj,
    proto: str,
    prefix: str,
    ports: str,
    to: str | None,
    pid: int | None,
    fd: int | None,
    drop: bool,
    name: str | None,
    on_missing: str,
    replace: bool,
    allow_missing: bool,
    exact: bool,
    as_json: bool,
) -> None:
    """Steer PROTO traffic to PREFIX on PORTS to one socket (or drop it).

    \b
    PROTO   tcp or udp
    PREFIX  an IPv4/IPv6 CIDR (192.0.2.0/24, 2001:db8::/64) or one address
    PORTS   N, LO-HI or all

    The longest prefix wins, then the narrowest port range. Port ranges of one protocol and
    prefix must nest or be disjoint. Re-running the same attach changes nothing, or
    registers the socket(s) of a restarted proxy. The first attach in a netns loads and
    attaches the dispatcher; later ones only add rules.

    When the target's socket is gone (the proxy stopped), its rules drop (or pass, with
    --on-missing pass); re-running attach registers the new socket.

    \b
    Examples:
      sklookupctl -n edge attach tcp 192.0.2.0/24 1-65535 --to 127.0.0.1:8080
      sklookupctl -n edge attach udp 2001:db8::/64 53 --to [::1]:5353
      sklookupctl -n edge attach tcp 192.0.2.66 22 --drop
    """
    res = api.attach(
        obj.netns,
        proto,
        prefix,
        ports,
        to=to,
        pid=pid,
        fd=fd,
        drop=drop,
        name=name,
        on_missing=on_missing,
        replace=replace,
        exact=exact,
        allow_missing=allow_missing,
        bpffs=obj.bpffs,
        wait=obj.wait,
    )
    if as_json:
        render.emit_json(res.to_json())
        return
    if res.loaded:
        render.say(f"loaded the dispatcher into {res.netns}")
    plan = res.plan
    if plan is None:
        verb = "added" if res.rule_changed else "unchanged:"
    elif any(r.key == res.rule.key for r in plan.added):
        verb = "added"
    elif any(b.key == res.rule.key for _a, b in plan.changed):
        verb = "changed"
    else:
        verb = "unchanged:"
    render.say(
        f"{verb} {res.rule.key} {res.rule.describe()}"
        + (f"  (socket {res.socket})" if res.socket and res.changed else "")
    )
    for note in res.notes:
        render.say(note)


@cli.command(context_settings=CONTEXT)
@click.argument("proto", metavar="PROTO", required=False)
@click.argument("prefix", metavar="PREFIX", required=False)
@click.argument("ports", metavar="PORTS", required=False)
@click.option(
    "--all",
    "all_",
    is_flag=True,
    help="Detach the dispatcher from the netns and remove all its rules and pins. "
    "Links of other tools stay.",
)
@click.option(
    "--if-exists",
    is_flag=True,
    help="A rule that is not there (or no dispatcher) is no error: exit 0, nothing changed "
    "(for scripts that must be idempotent). Without it, removing what is absent is an error, "
    "so a typo does not pass silently. detach --all never fails for an absent dispatcher.",
)
@json_option
@click.pass_obj
def detach(
    obj: Obj,
    proto: str | None,
    prefix: str | None,
    ports: str | None,
    all_: bool,
    if_exists: bool,
    as_json: bool,
) -> None:
    """Remove the rule PROTO PREFIX PORTS, or with --all everything sklookupctl attached.

    \b
    Examples:
      sklookupctl -n edge detach tcp 192.0.2.0/24 1-65535
      sklookupctl -n edge detach --all
    """
    given = [a for a in (proto, prefix, ports) if a is not None]
    if all_ and given:
        raise click.UsageError("give either PROTO PREFIX PORTS or --all, not both")
    if not all_ and len(given) != 3:
        raise click.UsageError("give PROTO PREFIX PORTS of the rule to remove, or --all")
    if all_:
        res = api.detach_all(obj.netns, bpffs=obj.bpffs, wait=obj.wait)
    else:
        assert proto is not None and prefix is not None and ports is not None
        res = api.detach(
            obj.netns, proto, prefix, ports, if_exists=if_exists, bpffs=obj.bpffs, wait=obj.wait
        )
    if as_json:
        render.emit_json(res.to_json())
    else:
        if res.removed:
            render.say(f"removed {res.removed} from {res.netns}")
        for note in res.notes:
            render.say(note)


@cli.command(context_settings=CONTEXT)
@click.argument("target", metavar="TARGET")
@click.option("--to", metavar="ADDR:PORT", help="The socket listening (bound) at this address.")
@click.option("--pid", type=Number(), metavar="PID", help="With --fd: fd FD of process PID.")
@click.option("--fd", type=Number(), metavar="FD", help="With --pid: the socket's fd.")
@click.option(
    "--fd-name",
    metavar="NAME",
    help="Of the sockets systemd passed (LISTEN_FDNAMES, FileDescriptorName= in the .socket "
    "unit), the one named NAME.",
)
@json_option
@click.pass_obj
def register(
    obj: Obj,
    target: str,
    to: str | None,
    pid: int | None,
    fd: int | None,
    fd_name: str | None,
    as_json: bool,
) -> None:
    """Give the declared TARGET its socket; its rules stay as they are.

    The socket comes from systemd socket activation when this command is started with
    sockets (LISTEN_FDS, LISTEN_PID; --fd-name picks one), from --to ADDR:PORT, from --pid
    and --fd, or by default from the address the target was declared with. Re-registering
    the socket already there changes nothing.

    \b
    A proxy whose socket is held by a systemd .socket unit keeps steering across restarts
    with no action at all: the socket, and so the SOCKMAP entry, outlives the proxy. Register
    it once from a service with Sockets= (docs/systemd/).

    \b
    Examples:
      sklookupctl -n edge register web                    # again at its declared address
      sklookupctl -n edge register web --to 127.0.0.1:8081
      sklookupctl -n edge register web --fd-name web      # from a systemd service
    """
    res = api.register(
        obj.netns, target, to=to, pid=pid, fd=fd, fd_name=fd_name, bpffs=obj.bpffs, wait=obj.wait
    )
    if as_json:
        render.emit_json(res.to_json())
        return
    if res.changed:
        render.say(f"registered target {res.target} in {res.netns}: socket {res.socket}")
    else:
        render.say(f"unchanged: target {res.target} already has socket {res.socket}")
    for note in res.notes:
        render.say(note)


@cli.command(context_settings=CONTEXT)
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--dry-run",
    "-N",
    is_flag=True,
    help="Check the file, find its sockets, and print what would change. Change nothing.",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Load targets whose socket is not there yet: each waits for it (its rules act as "
    "on_missing says) until `register`, attach or apply finds one. Without it, one proxy "
    "that is not up fails the whole file.",
)
@click.option(
    "--exit-code",
    is_flag=True,
    help=f"Exit {errors.EXIT_DIFFERS} when something changed (with --dry-run: would change), "
    "0 when not: change detection for scripts and Ansible, like git diff --exit-code.",
)
@json_option
@click.pass_obj
def apply(
    obj: Obj, file: str, dry_run: bool, allow_missing: bool, exit_code: bool, as_json: bool
) -> None:
    """Replace the netns's whole rule set with the one in FILE (TOML; - for stdin).

    All or nothing: the file is checked completely and every target's socket is found
    before anything changes; a problem is reported as FILE: rules[N].FIELD (N counts from
    0) or FILE: targets.NAME.FIELD. The switch is atomic: each connection sees the old rule
    set or the new one, never a mix. Applying the same file again changes nothing. A target
    already loaded whose proxy is down stays registered (a note says so), so the output of
    `export` always applies.

    \b
    A rule file (`sklookupctl export` writes one):
      [netns]                    # optional, for a restore at boot:
      create = true              # make the named namespace if it is missing
      addresses = ["192.0.2.0/24"]   # make these local (AnyIP); never removes any
      \b
      [targets.web]
      to = "127.0.0.1:8080"      # or: pid = 1234 and fd = 5; IPv6 as "[::1]:8080"
      # protocol = "tcp"         # optional; inferred from the rules that use it
      # reuseport = "exact"      # optional: this socket only, not its SO_REUSEPORT group
      \b
      [[rules]]
      protocol = "tcp"           # tcp | udp
      prefix = "192.0.2.0/24"    # IPv4 or IPv6
      ports = "1-65535"          # "443", "8000-8080" or "all"
      target = "web"             # or: action = "drop"
      # on_missing = "pass"      # optional; default "drop"

    \b
    Examples:
      sklookupctl -n edge apply --dry-run rules.toml
      sklookupctl -n edge apply rules.toml
      sklookupctl -n edge export > before.toml   # keep a copy to roll back to
    """
    with render.progress_for(file, quiet=as_json) as progress:
        res = api.apply(
            obj.netns,
            file,
            dry_run=dry_run,
            bpffs=obj.bpffs,
            progress=progress,
            wait=obj.wait,
            allow_missing=allow_missing,
        )
    differs = exit_code and res.to_json()["changed"]
    if differs:
        _report_lost[0] = errors.EXIT_DIFFERS
    if as_json:
        render.emit_json(res.to_json())
    else:
        render.apply_result(res)
    if differs:
        sys.exit(errors.EXIT_DIFFERS)


@cli.command(context_settings=CONTEXT)
@click.pass_obj
def export(obj: Obj) -> None:
    """Print the netns's rule set as a rule file for `apply`.

    Applying the output to the same netns changes nothing; it is also the way to keep a
    copy of the rules before a change, and to move them to another namespace or host.
    """
    render.write(api.export(obj.netns, bpffs=obj.bpffs, wait=obj.wait))


@cli.command(context_settings=CONTEXT)
@click.option(
    "--all", "all_", is_flag=True, help="Every namespace with state of an earlier layout."
)
@json_option
@click.pass_obj
def upgrade(obj: Obj, all_: bool, as_json: bool) -> None:
    """Move the namespace's state made by an earlier sklookupctl to this version, in place.

    Rules, targets, their sockets and the rules' counters are kept, and no connection is
    refused meanwhile: this version's program is attached beside the old one (both steer to
    the same sockets), then the old one is detached and its pins removed. Until then, writing
    commands refuse state of an earlier layout and say to run this. A namespace already of
    this version is left as it is.

    \b
    Examples:
      sklookupctl -n edge upgrade
      sklookupctl upgrade --all
    """
    results = (
        api.upgrade_all(bpffs=obj.bpffs, wait=obj.wait)
        if all_
        else [api.upgrade(obj.netns, bpffs=obj.bpffs, wait=obj.wait)]
    )
    if as_json:
        render.emit_json(
            results[0].to_json()
            if not all_
            else {
                "command": "upgrade",
                "changed": any(r.changed for r in results),
                "dry_run": False,
                "namespaces": [r.to_json() for r in results],
                "notes": [] if results else ["nothing to upgrade"],
            }
        )
        return
    for r in results:
        for note in r.notes:
            render.say(note)
    if all_ and not results:
        render.say("nothing to upgrade")


@cli.command(context_settings=CONTEXT)
@click.option(
    "--all",
    "all_",
    is_flag=True,
    help="List every namespace sklookupctl has state for, whatever became of it: steering, "
    "detached, dead (the namespace is gone: `gc` removes it), unfinished (left by a killed "
    "command).",
)
@click.option("--protocol", metavar="PROTO", help="Only rules and targets of tcp or udp.")
@click.option(
    "--prefix",
    metavar="PREFIX",
    help="Only rules whose prefix overlaps PREFIX (contains it or lies inside it), and their "
    "targets.",
)
@click.option("--target", metavar="NAME", help="Only rules steering to NAME, and that target.")
@json_option
@click.pass_obj
def status(
    obj: Obj,
    all_: bool,
    protocol: str | None,
    prefix: str | None,
    target: str | None,
    as_json: bool,
) -> None:
    """Show the dispatcher, a summary, its rules, and each target's socket, holder and
    counters.

    A target whose socket is gone shows as MISSING: its rules drop (or pass, where
    on-missing is pass) until attach or apply registers a new socket. A reuseport target
    shows how many of its group's members are alive. A target's counters add up what its
    rules decided since it was made, across rule-set changes; a rule's are its own.

    The text shows the first 100 rules (most specific first); --json lists every rule (it is
    streamed: 100,000 rules in well under a second). The filters narrow the rules and targets
    shown; the summary counts them all.
    """
    if all_:
        entries = api.status_all(bpffs=obj.bpffs, wait=obj.wait)
        if as_json:
            render.emit_json(entries)
        else:
            render.status_all(entries)
        return
    only = api.StatusFilter(protocol, prefix, target)
    st = api.status(obj.netns, bpffs=obj.bpffs, wait=obj.wait, only=only, lazy=True)
    if as_json:
        render.status_json(st)
    else:
        render.status(st)


@cli.command(context_settings=CONTEXT)
@json_option
@click.pass_obj
def gc(obj: Obj, as_json: bool) -> None:
    """Remove the state of namespaces that no longer exist, and what killed commands left.

    A namespace deleted while steered leaves its program and maps pinned in bpffs (its link
    detaches by itself); a command killed halfway leaves an unfinished directory or a stale
    generation. Every writing command cleans these up too; gc does it on its own, for
    example from a timer. Steering that works is never touched.
    """
    done = api.gc_state(bpffs=obj.bpffs, wait=obj.wait)
    if as_json:
        render.emit_json(api.gc_json(done))
        return
    for e in done:
        render.say(render.gc_line(e))
    if not done:
        render.say("nothing to remove")


@cli.command(context_settings=CONTEXT)
@json_option
@click.pass_obj
def doctor(obj: Obj, as_json: bool) -> None:
    """Check this machine and sklookupctl's state, and say how to fix what is wrong.

    \b
    Each check is ok, warn or FAIL, with what was found and the fix:
      kernel      release 5.9+, and a trivial sk_lookup program loads (attached nowhere)
      btf         /sys/kernel/btf/vmlinux (warn only: sklookupctl works without it)
      bpffs       --bpffs is a bpffs mount point; it and <bpffs>/sklookupctl pass the
                  trust checks every command applies (owner, mode, no symlink)
      privileges  root, or CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_BPF (and CAP_SYS_PTRACE)
      compiler    BCC importable, or a cached program image of this version
      cache       the program cache is trusted (else every load compiles afresh)
      memlock     RLIMIT_MEMLOCK, which matters only before kernel 5.11
      netns ...   every namespace with state in this bpffs: steering, detached, dead,
                  unfinished, damaged, an earlier version's; other sk_lookup programs
                  attached beside ours; a running dispatcher of another version

    doctor only reads: it creates no state directory, cache or mount (without root, it
    checks what it can). The report goes to stdout, also when something fails.

    \b
    Exit codes:
      0  no check failed (warnings are fine)
      4  at least one check failed (the report says which, and how to fix it)

    \b
    Examples:
      sklookupctl doctor
      sklookupctl --bpffs /run/my-bpffs doctor --json
    """
    from . import doctor as doctor_mod

    report = doctor_mod.run(obj.bpffs, obj.wait)
    if as_json:
        render.emit_json(report.to_json())
    else:
        for text in report.lines():
            render.say(text)
    if not report.ok:
        sys.exit(report.exit_code)


@cli.command(context_settings=CONTEXT)
@click.argument("proto", metavar="PROTO")
@click.argument("address", metavar="ADDRESS")
@click.argument("port", metavar="PORT")
@click.option(
    "--from",
    "source",
    metavar="ADDRESS",
    help="The client's address (default: 203.0.113.254 or 2001:db8:ffff::1; the dispatcher "
    "does not look at it, other programs may).",
)
@json_option
@click.pass_obj
def explain(
    obj: Obj, proto: str, address: str, port: str, source: str | None, as_json: bool
) -> None:
    """Say what happens to a new connection (tcp) or datagram (udp) to ADDRESS PORT in the
    namespace, and why: the verdict (steer, drop, pass), the rule that decided, the target
    and the socket selected (address, holder), and what every other sk_lookup program attached
    to the namespace does with it.

    \b
    Example:
      sklookupctl -n edge explain tcp 192.0.2.10 443

    It is the kernel's answer, not a model's: the live program is run on a made-up lookup
    (BPF_PROG_TEST_RUN) against the live maps and sockets, counting into a private map (the
    live counters do not move). Other programs are run the same way and combined as the kernel
    combines them (attach order; the last socket selected wins; else any drop drops; else the
    normal lookup goes on), each on its own: their own maps see the made-up lookup.
    Nothing is changed. Exit 0 whatever the verdict.
    """
    api.require_privileges()
    with open_netns(obj.netns) as ns:
        out = explain_mod.explain(
            ns, proto, address, port, bpffs=obj.bpffs, wait=obj.wait, source=source
        )
    if as_json:
        render.emit_json(out)
    else:
        render.explanation(out)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--listen",
    metavar="ADDR:PORT",
    help="Serve /metrics there until SIGTERM or Ctrl-C, read afresh at each scrape: "
    "127.0.0.1:9848, [::1]:9848, :9848 (every address).",
)
@click.option(
    "--output",
    "output",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Write them to FILE in one rename (for node_exporter's textfile collector); only a "
    "regular file is replaced; - is stdout.",
)
@click.option(
    "--per-rule",
    is_flag=True,
    help="Also a series per rule (labels protocol, prefix, ports, action, target): one per "
    "rule, so mind the cardinality of large rule sets.",
)
@click.pass_obj
def metrics(obj: Obj, listen: str | None, output: str | None, per_rule: bool) -> None:
    """Print the metrics once in the Prometheus text format, write them to a file, or serve
    them (--listen).

    \b
    Per namespace (label namespace): sklookupctl_steering, _rules, _targets, _generation,
    _memory_bytes, _tracing, and sklookupctl_drop_rule_drops_total{protocol}.
    Per target (labels namespace, target, protocol): sklookupctl_target_lookups_total,
    _steered_total, _dropped_total, _passed_total, _missing_socket_total,
    _assign_errors_total, and the gauges _socket_alive (0 or 1) and _sockets (live members).
    sklookupctl_up: 0 when the state could not be read (lock busy longer than --wait).

    Every namespace sklookupctl has state for, or only --netns when given. Target counters
    grow across every rule-set change for as long as the target exists (a rule moved or
    removed keeps what it counted for its target); per-rule counters follow their rule.

    \b
    Examples:
      sklookupctl metrics --output /var/lib/prometheus/node-exporter/sklookupctl.prom
      sklookupctl metrics --listen 127.0.0.1:9848      # docs/systemd: a unit for it
    """
    from . import metrics as metrics_mod

    api.require_privileges()
    if listen and output:
        raise click.UsageError("give --listen or --output, not both")
    if output == "" or listen == "":
        raise click.UsageError("--output and --listen take a value; an empty one is refused")
    with contextlib.ExitStack() as stack:
        only = stack.enter_context(open_netns(obj.netns)) if obj.netns is not None else None
        if listen:
            metrics_mod.serve(
                listen,
                obj.bpffs,
                obj.wait,
                only,
                per_rule,
                ready=lambda where: notices.emit(f"serving /metrics on {where[0]} port {where[1]}"),
            )
            return
        out = metrics_mod.text(obj.bpffs, obj.wait, only, per_rule)
    if output and output != "-":
        metrics_mod.write_file(output, out)
    else:
        render.write(out)


@cli.command(context_settings=CONTEXT)
@click.option("--count", type=Number(), metavar="N", help="End after N decisions shown.")
@click.option("--seconds", type=Seconds(), metavar="S", help="End after S seconds.")
@click.option(
    "--prefix",
    "prefixes",
    multiple=True,
    metavar="PREFIX",
    help="Only lookups for a destination address in PREFIX (repeatable).",
)
@click.option(
    "--port",
    "ports",
    multiple=True,
    metavar="PORTS",
    help="Only lookups for a destination port in PORTS: 443, 8000-8999 (repeatable).",
)
@click.option(
    "--verdict",
    "verdicts",
    multiple=True,
    type=click.Choice(trace_mod.VERDICTS),
    help="Only these verdicts (repeatable).",
)
@json_option
@click.pass_obj
def trace(
    obj: Obj,
    count: int | None,
    seconds: float | None,
    prefixes: tuple[str, ...],
    ports: tuple[str, ...],
    verdicts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Show the dispatcher's decisions as they happen, one line each (JSON lines with --json):
    time, protocol, source and destination, verdict (steer, drop, pass), target, rule.

    \b
    Example:
      sklookupctl -n edge trace --count 20 --port 443 --verdict drop

    Tracing costs nothing until it starts: it swaps a traced copy of the live program in
    (one atomic link update; every lookup is decided as before and counted as before) and the
    plain one back when it ends, after --count decisions, after --seconds, on Ctrl-C or on
    SIGTERM (exit 0). If trace is killed, the next sklookupctl command (status, say) puts the
    plain program back. A rule-set change during a trace is followed: the new rules are traced
    from then on (a note says so). Filters apply in this process; every decision is still
    written by the kernel, and any the buffer had no room for are counted (a note at the end).
    One trace per namespace at a time.
    """
    if count is not None and count < 1:
        raise click.BadParameter("must be at least 1", param_hint="--count")
    flt = trace_mod.Filter(
        prefixes=[rules_mod.parse_prefix(p) for p in prefixes],
        ports=[rules_mod.parse_ports(p) for p in ports],
        verdicts=set(verdicts),
    )
    api.require_privileges()
    shown = 0
    ended = ""
    with open_netns(obj.netns) as ns, trace_mod.Trace(ns, obj.bpffs, obj.wait) as tr:
        if not as_json:
            notices.emit(f"tracing {ns.label} (generation {tr.generation}); Ctrl-C ends")
        try:
            for d in tr.decisions(seconds, flt):
                if isinstance(d, str):
                    notices.emit(d)
                    continue
                if as_json:
                    render.json_line(d.to_json())
                else:
                    render.trace_line(d.to_json())
                shown += 1
                if render.output_stopped() or (count is not None and shown >= count):
                    break
        except KeyboardInterrupt as e:  # the usual way to end a trace, like SIGTERM
            ended = "SIGTERM" if isinstance(e, errors.Terminated) else "SIGINT"
    if tr.lost:
        notices.emit(f"{tr.lost} decisions were not traced: the buffer was full")
    if ended and not as_json:
        notices.emit(f"trace ended ({ended}): {shown} decisions shown")


@cli.group(context_settings=CONTEXT)
def netns() -> None:
    """Named network namespaces (under /run/netns)."""


IF_EXISTS = "What is not there is no error: exit 0, nothing changed (for idempotent scripts)."


def _said(as_json: bool, command: str, netns: str, changed: bool, line: str) -> None:
    if as_json:
        render.emit_json(api.simple_change_json(command, netns, changed, [line]))
    else:
        render.say(line)


@netns.command("add", context_settings=CONTEXT)
@click.argument("name")
@json_option
def netns_add(name: str, as_json: bool) -> None:
    """Create namespace NAME with lo up (unchanged if it exists)."""
    made = api.netns_add(name)
    line = (
        f"created network namespace {name}"
        if made
        else f"unchanged: network namespace {name} already exists"
    )
    _said(as_json, "netns add", name, made, line)


@netns.command("del", context_settings=CONTEXT)
@click.argument("name")
@click.option("--if-exists", is_flag=True, help=IF_EXISTS)
@json_option
@click.pass_obj
def netns_del(obj: Obj, name: str, if_exists: bool, as_json: bool) -> None:
    """Delete namespace NAME (detaching sklookupctl's dispatcher from it first)."""
    had = api.netns_del(name, if_exists=if_exists, bpffs=obj.bpffs, wait=obj.wait)
    there = had is not None
    line = (
        f"deleted network namespace {name}" + (" and its dispatcher" if had else "")
        if there
        else f"unchanged: no network namespace {name}"
    )
    _said(as_json, "netns del", name, there, line)


@netns.command("list", context_settings=CONTEXT)
@json_option
def netns_list(as_json: bool) -> None:
    """List named network namespaces (/run/netns)."""
    items = api.netns_list()
    if as_json:
        render.emit_json(items)
    elif items:
        render.simple_table(
            "Network namespaces",
            ["name", "inode"],
            [[str(i["name"]), str(i["inode"])] for i in items],
        )
    else:
        render.say("no named network namespaces")


@cli.group(context_settings=CONTEXT)
def addr() -> None:
    """AnyIP prefixes of the target netns: local routes on lo, so every address is local."""


@addr.command("add", context_settings=CONTEXT)
@click.argument("prefix")
@json_option
@click.pass_obj
def addr_add(obj: Obj, prefix: str, as_json: bool) -> None:
    """Make every address in PREFIX local to the netns."""
    added = api.addr_add(obj.netns, prefix)
    line = f"{'added' if added else 'unchanged: already there'} {prefix}"
    _said(as_json, "addr add", obj.netns or "", added, line)


@addr.command("del", context_settings=CONTEXT)
@click.argument("prefix")
@click.option("--if-exists", is_flag=True, help=IF_EXISTS)
@json_option
@click.pass_obj
def addr_del(obj: Obj, prefix: str, if_exists: bool, as_json: bool) -> None:
    """Remove an AnyIP PREFIX."""
    removed = api.addr_del(obj.netns, prefix, if_exists=if_exists) is not False
    line = f"removed {prefix}" if removed else f"unchanged: {prefix} is not an AnyIP prefix"
    _said(as_json, "addr del", obj.netns or "", removed, line)


@addr.command("list", context_settings=CONTEXT)
@json_option
@click.pass_obj
def addr_list(obj: Obj, as_json: bool) -> None:
    """List the AnyIP prefixes of the target netns."""
    items = api.addr_list(obj.netns)
    if as_json:
        render.emit_json(items)
    elif items:
        for i in items:
            render.say(i)
    else:
        render.say("no AnyIP prefixes")


@cli.command(context_settings=CONTEXT)
@click.option("--keep", is_flag=True, help="Leave the namespace, proxy and rules running.")
@click.option(
    "--samples",
    default=12,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Random (address, port) pairs to dial.",
)
@json_option
@click.pass_obj
def demo(obj: Obj, keep: bool, samples: int, as_json: bool) -> None:
    """Show sklookupctl working, in a namespace of its own.

    Creates a netns with 192.0.2.0/24 and 2001:db8::/64 as AnyIP, runs an echo proxy with one
    TCP and one UDP socket, steers tcp and udp on all ports of both prefixes to it, dials random
    addresses and ports, and shows where each landed. Then removes everything (unless --keep).
    With -n NAME the namespace it makes is called NAME (it must not exist yet).
    """
    from . import demo as demo_mod

    _report_lost[0] = None  # its output is what it is for (and its namespace is gone after)
    demo_mod.run(keep=keep, samples=samples, as_json=as_json, bpffs=obj.bpffs, name=obj.netns)


def _terminate(signum: int, frame: object) -> None:
    raise errors.Terminated()


def main(argv: list[str] | None = None) -> None:
    # SIGTERM before a change ends the command like Ctrl-C (one line, exit 143); once a change
    # has happened, both wait until its report is written too
    signal.signal(signal.SIGTERM, _terminate)
    interrupts.until_exit()
    try:
        cli.main(args=argv, prog_name="sklookupctl")
    finally:
        caught = interrupts.release()
        if caught:
            with contextlib.suppress(OSError):
                click.echo(
                    f"note: {' and '.join(caught)} arrived after the change was made; it was "
                    "finished and reported first",
                    err=True,
                )
