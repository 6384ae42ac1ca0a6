"""Rule files: the TOML that `apply` reads and `export` writes.

    [targets.web]
    to = "127.0.0.1:8080"      # or: pid = 1234 and fd = 5; IPv6 as "[::1]:8080"
    # protocol = "tcp"         # optional; inferred from the rules that use the target

    [[rules]]
    protocol = "tcp"           # tcp | udp
    prefix = "192.0.2.0/24"    # v4 or v6
    ports = "1-65535"          # "443", "8000-8080" or "all"
    target = "web"             # or: action = "drop"
    # on_missing = "pass"      # optional; default "drop"

Pure Python, no kernel. Every problem is reported as FILE: rules[N].FIELD (N counts from 0,
in file order) or FILE: targets.NAME.FIELD, and nothing is applied unless the whole file is valid.

Python's tomllib needs about 15 µs per rule; files in the shape `export` writes (one `key =
"string"` per line) are read by a small exact parser for that subset instead, about ten times
faster. Anything outside the subset goes to tomllib, so the result is always what TOML says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import validate
from .errors import InvalidArgument, SklookupError
from .rules import (
    DROP,
    ON_MISSING,
    STEER,
    IPAddress,
    IPNetwork,
    Rule,
    RuleKey,
    RuleSet,
    check_name,
    format_endpoint,
    format_ports,
    parse_endpoint,
    parse_ports,
    parse_prefix,
    parse_protocol,
    quick_prefix,
)

RULE_FIELDS = ("protocol", "prefix", "ports", "target", "action", "on_missing")
TARGET_FIELDS = ("to", "pid", "fd", "protocol", "reuseport")
REUSEPORT = ("group", "exact")


class FileError(InvalidArgument):
    """A rule file that cannot be applied; `where` is FILE: rules[N].FIELD or the like."""

    def __init__(self, where: str, message: str, hint: str = "") -> None:
        super().__init__(f"{where}: {message}", hint)
        self.where = where


@dataclass(frozen=True)
class TargetSpec:
    """A target as a file declares it: by address, or by a process's fd."""

    name: str
    proto: str
    to: tuple[IPAddress, int] | None = None
    pid: int | None = None
    fd: int | None = None
    exact: bool = False  # reuseport = "exact": this socket only, not its SO_REUSEPORT group

    def describe(self) -> str:
        if self.to is not None:
            return format_endpoint(*self.to)
        return f"pid {self.pid} fd {self.fd}"


@dataclass
class RuleFile:
    rules: RuleSet
    targets: dict[str, TargetSpec]
    unused_targets: list[str]
    create_netns: bool = False  # [netns] create = true: make the named namespace if missing
    addresses: list[IPNetwork] = dataclasses.field(default_factory=list)  # [netns] AnyIP
    # the live rules were read from this very file (parse's `known`): its rules were not read
    # again, and `rules` is empty; `text` is kept, to read them after all if that changes
    same_as_live: bool = False
    text: str = ""
    source: str = ""  # source_digest of the text (apply sets it)

    def index(self, key: RuleKey) -> int:
        """A rule's position in the file (for messages: rules keep the file's order)."""
        for i, k in enumerate(self.rules.rules):
            if k == key:
                return i
        raise KeyError(key)


# -- reading TOML ------------------------------------------------------------------------------

_LINE = re.compile(
    r"""[ \t]*(?:
        (?P<aot>\[\[[ \t]*rules[ \t]*\]\])
      | \[[ \t]*targets\.(?:(?P<bare>[A-Za-z0-9_-]+)|"(?P<quoted>[^"\\\x00-\x1f\x7f]*)")[ \t]*\]
      | (?P<key>[A-Za-z0-9_-]+)[ \t]*=[ \t]*
        (?:"(?P<str>[^"\\\x00-\x1f\x7f]*)"|'(?P<lit>[^'\x00-\x1f\x7f]*)'|(?P<int>[+-]?(?:0|[1-9][0-9]*)))
    )?[ \t]*(?:\#[^\x00-\x08\x0a-\x1f\x7f]*)?""",
    re.VERBOSE,
)


_KNOWN_KEYS = frozenset(RULE_FIELDS + TARGET_FIELDS)


def _fast_parse(text: str) -> dict[str, Any] | None:
    """The subset: [[rules]], [targets.NAME], key = "str" | 'str' | int, comments, blanks.
    None when the text leaves it (tomllib then has the final word)."""
    rules: list[dict[str, Any]] = []
    targets: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    table = top
    match = _LINE.fullmatch
    known = _KNOWN_KEYS
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        if line == "[[rules]]" and "rules" not in top:
            table = {}
            rules.append(table)
            continue
        # the line export writes, without the regex: key = "plain string"
        key, eq, val = line.partition(" = ")
        if (
            eq
            and key in known
            and len(val) > 1
            and val[0] == '"'
            and val[-1] == '"'
            and '"' not in val[1:-1]
            and "\\" not in val
            and val.isprintable()
        ):
            if key in table:
                return None
            table[key] = val[1:-1]
            continue
        m = match(line)
        if m is None:
            return None
        key = m.group("key")
        if key is not None:
            if key in table:
                return None  # a duplicate key: an error, worded by tomllib
            s = m.group("str")
            if s is None:
                s = m.group("lit")
            table[key] = s if s is not None else int(m.group("int"))
        elif m.group("aot"):
            if "rules" in top:
                return None
            table = {}
            rules.append(table)
        else:
            name = m.group("bare") or m.group("quoted")
            if name is None:
                continue  # blank or comment
            if name in targets or "targets" in top:
                return None
            table = targets[name] = {}
    out: dict[str, Any] = dict(top)
    if rules:
        out["rules"] = rules
    if targets:
        out["targets"] = targets
    return out


_S = r'"([^"\\\x00-\x1f\x7f]*)"'  # a basic string without escapes
_RULE_RE = re.compile(
    rf"\[\[rules\]\]\nprotocol = {_S}\nprefix = {_S}\nports = {_S}\n"
    rf"(?:(target) = {_S}\n|(action) = {_S}\n)(?:(on_missing) = {_S}\n)?(\n*)"
)
# the text of a block around its captured fields and line ends
_BLOCK_FIXED = len('[[rules]]\nprotocol = ""\nprefix = ""\nports = ""\n = ""\n')
_FIRST_RULE = re.compile(r"^\[\[rules\]\]$", re.MULTILINE)


def _canonical(text: str) -> dict[str, Any] | None:
    """The exact shape `export` writes: targets first, then rule tables of the same keys in the
    same order, one per block. The head is read here; the rules are checked and picked apart
    by a regular expression, in C, a chunk at a time as `parse` reads them (_Rows). None when
    the head already leaves the shape."""
    m = _FIRST_RULE.search(text)
    if m is None:
        return None
    head = text[: m.start()]
    if not text.endswith("\n"):
        text += "\n"
    doc = _fast_parse(head)
    if doc is None:
        # a head outside the subset ([netns] addresses = [...]) is small: tomllib reads it,
        # and the rules still take the fast way
        import tomllib

        try:
            doc = tomllib.loads(head)
        except (tomllib.TOMLDecodeError, RecursionError):
            return None
        if validate.toml_depth(doc) > validate.TOML_DEPTH_MAX:
            return None  # the general way words it
    if "rules" in doc:
        return None
    doc["rules"] = _Rows(text, m.start())
    return doc


class _NotCanonical(Exception):
    """A chunk of rules left export's shape: the file goes the general way."""


class _Rows:
    """The rules of a file in export's shape, as the regular expression's tuples (protocol,
    prefix, ports, "target", target, "action", action, "on_missing", on_missing, line ends),
    a chunk of about CHUNK characters at a time (so that a large file's rules never all exist
    as tuples of strings at once). A chunk whose blocks do not make up all of its text raises
    _NotCanonical."""

    CHUNK = 1 << 20

    def __init__(self, text: str, start: int) -> None:
        self.text, self.start = text, start
        self.at = start  # the chunks read end here

    def __len__(self) -> int:
        return self.text.count("[[rules]]\n", self.start)  # exact when the chunks are whole

    def chunks(self, start: int | None = None) -> Iterator[list[tuple[str, ...]]]:
        text, pos, end = self.text, self.start if start is None else start, len(self.text)
        while pos < end:
            cut = text.find("\n[[rules]]\n", pos + self.CHUNK)
            stop = end if cut < 0 else cut + 1
            rows = _RULE_RE.findall(text, pos, stop)
            # the blocks found must make up the whole chunk, nothing skipped between them
            # (the captures, plus each block's fixed text, plus ` = ""\n` of an on_missing line)
            covered = len(rows) * _BLOCK_FIXED + sum(map(len, itertools.chain.from_iterable(rows)))
            covered += len(' = ""\n') * sum(1 for row in rows if row[7])
            if covered != stop - pos:
                raise _NotCanonical
            self.at = stop
            yield rows
            pos = stop

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        for rows in self.chunks():
            yield from rows

    def whole(self) -> bool:
        """Whether the chunks not read yet are in export's shape too."""
        try:
            for _rows in self.chunks(self.at):
                pass
        except _NotCanonical:
            return False
        return True

    @staticmethod
    def table(row: tuple[str, ...]) -> dict[str, Any]:
        proto, prefix, ports, tk, tv, _ak, av, ok, ov, _ends = row
        d = {"protocol": proto, "prefix": prefix, "ports": ports}
        if tk:
            d["target"] = tv
        else:
            d["action"] = av
        if ok:
            d["on_missing"] = ov
        return d


def loads_toml(text: str, where: str) -> dict[str, Any]:
    """The document, as TOML reads it: by the subset's reader, else by tomllib."""
    fast = _fast_parse(text)
    if fast is not None:
        return fast
    import tomllib

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FileError(where, f"not valid TOML: {e}") from None
    except RecursionError:
        doc = None  # arrays or inline tables nested thousands deep
    if doc is None or validate.toml_depth(doc) > validate.TOML_DEPTH_MAX:
        raise FileError(
            where, "nested too deeply to be a rule file", "a file has [targets.NAME] and [[rules]]"
        )
    return doc


# -- validating --------------------------------------------------------------------------------

Progress = Callable[[int, int], None]


def _str_field(d: dict[str, Any], field: str, where: str, required: bool) -> str | None:
    v = d.get(field)
    if v is None:
        if required:
            raise FileError(f"{where}.{field}", "missing", f"every rule needs {field}")
        return None
    if not isinstance(v, str):
        raise FileError(f"{where}.{field}", f"must be a string, not {type(v).__name__}")
    return v


class _Bad(Exception):
    """A problem in one field of one rule; the caller adds the file and the rule's index."""

    def __init__(self, field: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.field, self.message, self.hint = field, message, hint


def _prefix_ints(text: str) -> tuple[int, int, int]:
    quick = quick_prefix(text)
    if quick is not None:
        return quick
    p = parse_prefix(text)
    return p.version, int(p.network_address), p.prefixlen


_PARSERS: dict[str, Callable[[str], Any]] = {
    "protocol": parse_protocol,
    "prefix": _prefix_ints,
    "ports": parse_ports,
}


Cache = dict[str, dict[Any, Any]]  # field -> text -> parsed: files repeat themselves


def _parsed(d: dict[str, Any], field: str, cache: Cache) -> Any:
    text = d.get(field)
    if text is None:
        raise _Bad(field, "missing", f"every rule needs {field}")
    if not isinstance(text, str):
        raise _Bad(field, f"must be a string, not {type(text).__name__}")
    v = cache[field].get(text)
    if v is None:
        try:
            v = cache[field][text] = _PARSERS[field](text)
        except SklookupError as e:
            raise _Bad(field, e.message, e.hint) from None
    return v


def _optional(d: dict[str, Any], field: str) -> str | None:
    v: str | None = d.get(field)
    if v is not None and not isinstance(v, str):
        raise _Bad(field, f"must be a string, not {type(v).__name__}")
    return v


_RULE_FIELD_SET = frozenset(RULE_FIELDS)
_new = tuple.__new__


def _parse_rule(d: dict[str, Any], targets: dict[str, Any], cache: Cache) -> Rule:
    if not d.keys() <= _RULE_FIELD_SET:
        field = next(f for f in d if f not in _RULE_FIELD_SET)
        raise _Bad(field, "unknown field", f"a rule has {', '.join(RULE_FIELDS)}")
    # cache hits first (a file repeats protocols and ports); _parsed checks the type and
    # explains any problem (the caches hold strings only: a list or a table is never looked up)
    p, x, o = d.get("protocol"), d.get("prefix"), d.get("ports")
    proto = (p.__class__ is str and cache["protocol"].get(p)) or _parsed(d, "protocol", cache)
    version, net, plen = (x.__class__ is str and cache["prefix"].get(x)) or _parsed(
        d, "prefix", cache
    )
    lo, hi = (o.__class__ is str and cache["ports"].get(o)) or _parsed(d, "ports", cache)
    target = d.get("target")
    action = d.get("action")
    on_missing = d.get("on_missing")
    if action is None and on_missing is None and target.__class__ is str and target in targets:
        # the common case, valid by the checks above: made without checking again
        key = _new(RuleKey, (proto, version, net, plen, lo, hi))
        rule: Rule = _new(Rule, (key, STEER, target, "drop"))
        return rule
    target, action, on_missing = (_optional(d, f) for f in ("target", "action", "on_missing"))
    if action is not None and action not in (STEER, DROP):
        raise _Bad(
            "action", f"{validate.show(action)} is not an action", "use drop, or give a target"
        )
    if action == DROP:
        if target is not None:
            raise _Bad("target", "a drop rule has no target", "remove one of action and target")
        if on_missing is not None:
            raise _Bad("on_missing", "applies to rules with a target, not to drop rules")
        return Rule(RuleKey.of(proto, version, net, plen, lo, hi), DROP, None, "drop")
    if target is None:
        raise _Bad("target", "missing", 'give a target, or action = "drop"')
    if not target:
        raise _Bad("target", "is empty", 'name a target, or action = "drop"')
    if on_missing is not None and on_missing not in ON_MISSING:
        raise _Bad("on_missing", f"{validate.show(on_missing)} is not valid", "use drop or pass")
    if target not in targets:
        raise _Bad(
            "target",
            f"no target {validate.show(target)} in the file",
            f"declare it as [targets.{validate.show(target)[1:-1]}]",
        )
    return Rule(RuleKey.of(proto, version, net, plen, lo, hi), STEER, target, on_missing or "drop")


def _quick_ports(text: str) -> tuple[int, int] | None:
    """parse_ports for the common text, fast: N or LO-HI in plain digits, no leading zero,
    within 1-65535, LO <= HI. None for anything else (parse_ports then decides)."""
    lo_text, dash, hi_text = text.partition("-")
    if not dash:
        hi_text = lo_text
    for t in (lo_text, hi_text):
        if not (t.isascii() and t.isdigit() and len(t) <= 5 and t[0] != "0"):
            return None
    lo, hi = int(lo_text), int(hi_text)
    if hi > 65535 or lo > hi:
        return None
    return lo, hi


def _parse_rows(
    rows: _Rows,
    targets: dict[str, Any],
    cache: Cache,
    rs: RuleSet,
    protos_of: dict[str, set[str]],
    name: str,
    progress: Progress | None,
) -> None:
    """`parse`'s loop over rules in export's shape: steering rules whose fields the caches
    already hold are made here, straight from the row; every other row goes the way of a
    table (_parse_rule), which makes and checks it, and words any problem."""
    seen = rs.rules
    add = seen.setdefault
    protos, portss = cache["protocol"], cache["ports"]
    pairs: set[tuple[str, str]] = set()  # (target, protocol) of the rules made here
    pair = pairs.add
    i = 0
    total = len(rows) if progress is not None else 0
    last_x, last_where = "", None
    for chunk in rows.chunks():
        if progress is not None:
            progress(i, total)
        for row in chunk:
            p, x, o, tk, target, _ak, av, ok, _ov, _e = row
            proto = protos.get(p)
            # a prefix's rules are next to each other in export's order: only the last prefix
            # is remembered (a cache of them all would keep every chunk's strings alive)
            if x == last_x:
                where = last_where
            else:
                last_x, where = x, quick_prefix(x)
                last_where = where
            ports = portss.get(o)
            if ports is None:
                ports = _quick_ports(o)
                if ports is None:
                    with contextlib.suppress(SklookupError):  # the way of a table words it
                        ports = parse_ports(o)
                if ports is not None:
                    portss[o] = ports
            if (
                not ok
                and proto
                and where
                and ports
                and ((tk and target in targets) or (not tk and av == DROP))
            ):
                # the common rules, valid by the checks above: made without checking again
                key = _new(RuleKey, (proto, *where, *ports))
                if tk:
                    rule: Rule = _new(Rule, (key, STEER, target, "drop"))
                    pair((target, proto))
                else:
                    rule = _new(Rule, (key, DROP, None, "drop"))
            else:
                try:
                    rule = _parse_rule(_Rows.table(row), targets, cache)
                except _Bad as e:
                    where_ = f"{name}: rules[{i}]" + (f".{e.field}" if e.field else "")
                    raise FileError(where_, e.message, e.hint) from None
                key = rule.key
                if rule.target is not None:
                    pair((rule.target, key.proto))
            if add(key, rule) is not rule:
                first = list(seen).index(key)
                raise FileError(
                    f"{name}: rules[{i}]", f"rule {key} is also rules[{first}]", "keep one of them"
                )
            i += 1
    for target, proto in pairs:
        protos_of.setdefault(target, set()).add(proto)


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """Errors of the parsers inside get `where` in front."""
    try:
        yield
    except SklookupError as e:
        raise FileError(where, e.message, e.hint) from None


_INDENTED_BRACKET = re.compile(r"\n[ \t]+\[")


def _tables_after(text: str, start: int) -> bool:
    """Whether a table header other than [[rules]] may come after `start` (the first
    [[rules]]): a line starting with [ that is not exactly [[rules]] (conservatively: a line of
    a multi-line string that looks like one counts too). Counted in C, not matched line by
    line."""
    lines = text.count("\n[", start)
    rules = text.count("\n[[rules]]\n", start) + text.endswith("\n[[rules]]")
    return lines != rules or _INDENTED_BRACKET.search(text, start) is not None


def source_digest(text: str) -> str:
    """What identifies a rule file's rules: a digest of its text and of the code that reads
    it (another version might read the same text otherwise). `apply` keeps it with the rules
    it commits; the same file applied again need not be read again ("": no digest)."""
    code = _code_digest()
    if not code:
        return ""
    h = hashlib.blake2b(code, digest_size=20)
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@functools.cache
def _code_digest() -> bytes:
    """The sources of the modules that decide what a rule file means."""
    from . import rules

    h = hashlib.blake2b(digest_size=20)
    try:
        for module in (__file__, rules.__file__, validate.__file__):
            with open(module, "rb") as f:
                h.update(f.read())
    except OSError:
        return b""
    return h.digest()


def parse(
    text: str,
    name: str,
    progress: Progress | None = None,
    known: dict[str, str] | None = None,
) -> RuleFile:
    """Validate a rule file completely; raise FileError at the first problem.

    `known`: the live rules were read from this very text (`source_digest`), and these are
    the targets they use, with their protocols. A file whose tables but the rules all come
    before them (as export writes it) then has only that head read (targets, [netns]): the
    result says `same_as_live`, with no rules."""
    if not text.isascii():
        try:
            text.encode("utf-8")  # a str from a library caller may hold lone surrogates
        except UnicodeEncodeError as e:
            raise FileError(name, f"not UTF-8 text ({e.reason} at character {e.start})") from None
    doc = _canonical(text)
    rows = doc.get("rules") if doc is not None else None
    if (
        known is not None
        and doc is not None
        and isinstance(rows, _Rows)
        and not _tables_after(text, rows.start)
    ):
        # every table but the rules is in the head: it says everything but the rules
        rf = _parse_doc(doc, name, progress, known)
        rf.same_as_live, rf.text = True, text
        return rf
    if doc is not None and isinstance(rows, _Rows):
        # export's shape, as far as its head tells: its rules are checked as they are read
        try:
            return _parse_doc(doc, name, progress)
        except _NotCanonical:
            pass
        except FileError:
            if rows.whole():
                raise
        # a part of it leaves the shape: the file is read the general way, whose problem
        # (maybe another, earlier one) is the one reported
    return _parse_doc(loads_toml(text, name), name, progress)


def _parse_doc(
    doc: dict[str, Any],
    name: str,
    progress: Progress | None,
    known: dict[str, str] | None = None,
) -> RuleFile:
    for table in doc:
        if table not in ("rules", "targets", "netns"):
            raise FileError(
                f"{name}: {validate.label(table)}",
                "unknown table",
                "a file has [netns], [targets.NAME] and [[rules]]",
            )
    create, addresses = _netns_table(doc.get("netns", {}), name)
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, _Rows) and (
        not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules)
    ):
        raise FileError(
            f"{name}: rules", "must be an array of tables", "write each rule as [[rules]]"
        )
    raw_targets = doc.get("targets", {})
    if not isinstance(raw_targets, dict) or not all(
        isinstance(t, dict) for t in raw_targets.values()
    ):
        raise FileError(f"{name}: targets", "must be tables", "write each target as [targets.NAME]")

    rs = RuleSet()
    seen = rs.rules
    protos_of: dict[str, set[str]] = {}
    total = len(raw_rules)
    step = max(1, total // 100)
    cache: Cache = {f: {} for f in _PARSERS}
    if known is not None:
        protos_of = {t: {p} for t, p in known.items()}  # the rules are the live ones
    elif isinstance(raw_rules, _Rows):
        _parse_rows(raw_rules, raw_targets, cache, rs, protos_of, name, progress)
    for i, d in enumerate(() if isinstance(raw_rules, _Rows) or known is not None else raw_rules):
        try:
            rule = _parse_rule(d, raw_targets, cache)
        except _Bad as e:
            where = f"{name}: rules[{i}]" + (f".{e.field}" if e.field else "")
            raise FileError(where, e.message, e.hint) from None
        key = rule.key
        if key in seen:
            first = list(seen).index(key)
            raise FileError(
                f"{name}: rules[{i}]", f"rule {key} is also rules[{first}]", "keep one of them"
            )
        seen[key] = rule
        if rule.target is not None:
            protos_of.setdefault(rule.target, set()).add(key.proto)
        if progress is not None and i % step == 0:
            progress(i, total)
    _check_overlaps(rs, name)

    targets: dict[str, TargetSpec] = {}
    unused: list[str] = []
    for tname, t in raw_targets.items():
        # a name that is not printable is shown quoted, so the message stays one line
        where = f"{name}: targets.{validate.label(tname)}"
        with _at(where):
            check_name(tname)
        for field in t:
            if field not in TARGET_FIELDS:
                raise FileError(
                    f"{where}.{field}", "unknown field", f"a target has {', '.join(TARGET_FIELDS)}"
                )
        used = protos_of.get(tname)
        spec = _target(tname, t, where, used or set())  # checked whole, used or not
        if used is None:
            unused.append(tname)
        else:
            targets[tname] = spec
    if progress is not None:
        progress(total, total)
    return RuleFile(rs, targets, unused, create, addresses)


def _netns_table(t: Any, name: str) -> tuple[bool, list[IPNetwork]]:
    """[netns]: create = true (make the named namespace if it is missing), addresses = [...]
    (AnyIP prefixes made local in it)."""
    where = f"{name}: netns"
    if not isinstance(t, dict):
        raise FileError(where, "must be a table", "write [netns]")
    for field_ in t:
        if field_ not in ("create", "addresses"):
            raise FileError(
                f"{where}.{validate.label(field_)}",
                "unknown field",
                "[netns] has create, addresses",
            )
    create = t.get("create", False)
    if not isinstance(create, bool):
        raise FileError(f"{where}.create", f"must be true or false, not {type(create).__name__}")
    raw = t.get("addresses", [])
    if not isinstance(raw, list):
        raise FileError(f"{where}.addresses", "must be a list of prefixes", 'as ["192.0.2.0/24"]')
    out: list[IPNetwork] = []
    for i, p in enumerate(raw):
        if not isinstance(p, str):
            raise FileError(f"{where}.addresses[{i}]", f"must be a string, not {type(p).__name__}")
        with _at(f"{where}.addresses[{i}]"):
            net = parse_prefix(p)
        if net not in out:
            out.append(net)
    return create, out


def _target(tname: str, t: dict[str, Any], where: str, used: set[str]) -> TargetSpec:
    """A target's table checked; `used`: the protocols of the rules that use it (none: it is
    checked all the same, with the protocol it declares, else tcp)."""
    declared = _str_field(t, "protocol", where, False)
    if declared is not None:
        with _at(f"{where}.protocol"):
            proto = parse_protocol(declared)
        if used - {proto}:
            raise FileError(
                f"{where}.protocol",
                f"is {proto}, but {'/'.join(sorted(used - {proto}))} rules use it",
                "a socket is either tcp or udp: use two targets",
            )
    elif len(used) > 1:
        raise FileError(
            where,
            "both tcp and udp rules use it",
            "a socket is either tcp or udp: use two targets",
        )
    else:
        proto = next(iter(used), "tcp")
    reuseport = _str_field(t, "reuseport", where, False) or "group"
    if reuseport not in REUSEPORT:
        raise FileError(
            f"{where}.reuseport",
            f"{validate.show(reuseport)} is not valid",
            "use group (the kernel picks within the socket's SO_REUSEPORT group) or exact",
        )
    exact = reuseport == "exact"
    to_text = _str_field(t, "to", where, False)
    pid, fd = t.get("pid"), t.get("fd")
    if to_text is not None and (pid is not None or fd is not None):
        raise FileError(where, "has both to and pid/fd", "give one way to find the socket")
    if to_text is not None:
        with _at(f"{where}.to"):
            to = parse_endpoint(to_text)
        return TargetSpec(tname, proto, to=to, exact=exact)
    if pid is None and fd is None:
        raise FileError(f"{where}.to", "missing", 'give to = "ADDR:PORT", or pid and fd')
    for field, v in (("pid", pid), ("fd", fd)):
        if v is None:
            raise FileError(f"{where}.{field}", "missing", "pid and fd go together")
        check = validate.pid if field == "pid" else validate.fd
        with _at(f"{where}.{field}"):
            check(v)
    return TargetSpec(tname, proto, pid=pid, fd=fd, exact=exact)


def _check_overlaps(rs: RuleSet, name: str) -> None:
    """Port ranges of one protocol and prefix must nest or be disjoint."""
    by_prefix: dict[tuple[str, int, int, int], list[RuleKey]] = {}
    for key in rs.rules:
        by_prefix.setdefault((key.proto, key.version, key.net, key.plen), []).append(key)
    for keys in by_prefix.values():
        if len(keys) < 2:
            continue
        keys.sort(key=lambda k: (k.lo, -k.hi))
        stack: list[RuleKey] = []
        for k in keys:
            while stack and stack[-1].hi < k.lo:
                stack.pop()
            if stack and k.hi > stack[-1].hi:
                order = list(rs.rules)
                index = {k: order.index(k), stack[-1]: order.index(stack[-1])}
                later, earlier = (k, stack[-1]) if index[k] > index[stack[-1]] else (stack[-1], k)
                raise FileError(
                    f"{name}: rules[{index[later]}].ports",
                    f"{format_ports(later.lo, later.hi)} partly overlaps rules[{index[earlier]}] "
                    f"({earlier}): ambiguous",
                    "port ranges of one protocol and prefix must nest or be disjoint",
                )
            stack.append(k)


# -- writing -----------------------------------------------------------------------------------


def _q(s: str) -> str:
    """A TOML basic string (names and addresses never need escapes; be safe anyway)."""
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{out}"'


def dumps(
    rules: RuleSet,
    targets: dict[str, tuple[str, IPAddress, int, bool]],
    header: str = "",
    addresses: list[IPNetwork] | None = None,
) -> str:
    """The file `apply` reads back to the same rule set. `targets`: name -> (protocol,
    address, port, exact), for the targets the rules use; `addresses`: the namespace's AnyIP
    prefixes ([netns])."""
    out: list[str] = []
    if header:
        out += [f"# {line}" if line else "#" for line in header.splitlines()]
        out.append("")
    if addresses:
        out += ["[netns]", "addresses = [" + ", ".join(_q(str(a)) for a in addresses) + "]", ""]
    for name in sorted(targets):
        proto, addr, port, exact = targets[name]
        key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _q(name)
        out += [
            f"[targets.{key}]",
            f"to = {_q(format_endpoint(addr, port))}",
            f"protocol = {_q(proto)}",
        ]
        if exact:
            out.append('reuseport = "exact"')
        out.append("")
    for r in rules.sorted():
        k = r.key
        out += [
            "[[rules]]",
            f'protocol = "{k.proto}"',
            f'prefix = "{k.prefix}"',
            f'ports = "{format_ports(k.lo, k.hi)}"',
        ]
        if r.action == DROP:
            out.append('action = "drop"')
        else:
            out.append(f"target = {_q(r.target or '')}")
            if r.on_missing != "drop":
                out.append(f'on_missing = "{r.on_missing}"')
        out.append("")
    return "\n".join(out)
