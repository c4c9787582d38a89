"""The main configuration file and its ``conf.d/*.toml`` drop-ins, merged into one document.

Packaging and generated tenant lists add files beside ``sweeperd.toml`` instead of editing it.
The files are read in order: the main file first, then every regular file in ``conf.d/`` (beside
the main file) whose name ends in ``.toml`` and does not start with ``.``, sorted by the bytes of
the name. Editor backups and package-manager leftovers (``x.toml~``, ``.x.toml.swp``,
``x.toml.dpkg-old``) do not end in ``.toml`` or are hidden, so they are never read.

The merge rules:

* tables merge, recursively (``[databases.main]`` in one file, ``[databases.other]`` in the next);
* arrays of tables (``[[tenants]]``, ``[[plugins.retention.rules]]``, or an inline array whose
  every item is a table) append, in file order;
* any other value (a string, a number, a plain array, an empty array) set by two files is a
  problem naming the key and both files, and so is a table in one file where another has a value.

Where each key came from is kept (:class:`Origins`), so that a problem with a key a drop-in set
names that drop-in, not the main file. It costs one small record per table that more than one
file touched and per run of array items from one file: 50 000 tenants in five files are five.
Nothing here validates values (:mod:`sweeperd.config` does) or connects to anything.
"""

from __future__ import annotations

import bisect
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import kind_of, toml_key

__all__ = ["CONF_D", "MAIN_FILE", "Merged", "Origins", "dropin_files", "main_file", "read_merged"]

MAIN_FILE = "sweeperd.toml"  # what ``-c DIR`` reads in DIR
CONF_D = "conf.d"  # the drop-in directory, beside the main file
SUFFIX = ".toml"

# One segment of a key path as problems spell it (sweeperd.settings.At.key): a bare key, a quoted
# one (toml_key escapes only \ and "), or an array index.
_SEGMENT = re.compile(r'\.?(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)")|\[(\d+)\]')
_ESCAPE = re.compile(r"\\(.)")


@dataclass(slots=True)
class _Node:
    """Where one table or array came from: ``file`` made it; ``keys`` holds only the children
    that another file set or that were merged (every other child is ``file``'s too); ``runs``
    the (first index, file) of each file's items of an array of tables that several extended."""

    file: int
    keys: dict[str, _Node] | None = None
    runs: list[tuple[int, int]] | None = None

    def child(self, key: str) -> _Node:
        """The record of child ``key``, made (as this node's file's) to be written into."""
        if self.keys is None:
            self.keys = {}
        node = self.keys.get(key)
        if node is None:
            node = self.keys[key] = _Node(self.file)
        return node


@dataclass(frozen=True, slots=True)
class Origins:
    """Which file set each key of a merged document."""

    files: tuple[Path, ...]  # the main file, then the drop-ins read, in order
    _root: _Node = field(default_factory=lambda: _Node(0), repr=False, compare=False)

    @property
    def main(self) -> Path:
        return self.files[0]

    @property
    def dropins(self) -> tuple[Path, ...]:
        return self.files[1:]

    def file_of(self, key: str) -> Path:
        """The file that set ``key`` (``tenants[3].schma``, ``databases."a b".dsn``).

        A key no file set (``required: …``) is the file that made the table it would be in; a
        table or array several files made is the first one's; a key path that does not parse
        any further is the file of its part that did.
        """
        node, file, pos = self._root, self._root.file, 0
        while pos < len(key):
            match = _SEGMENT.match(key, pos)
            if match is None:
                break
            pos = match.end()
            bare, quoted, index = match.groups()
            if index is not None:
                # Items are never merged: everything below an item is its file's.
                if node.runs is not None:
                    starts = [start for start, _ in node.runs]
                    file = node.runs[bisect.bisect_right(starts, int(index)) - 1][1]
                break
            name = bare if bare is not None else _ESCAPE.sub(r"\1", quoted)
            child = node.keys.get(name) if node.keys is not None else None
            if child is None:
                break
            node, file = child, child.file
        return self.files[file]


@dataclass(frozen=True, slots=True)
class Merged:
    """The merged document, where its keys came from, and every problem reading or merging.

    ``complete``: every file was read (the problems, if any, are keys set twice), so the
    document is worth validating: what a file that could not be read would have added is not
    missing from it.
    """

    doc: dict[str, Any]
    origins: Origins
    problems: list[str]
    complete: bool


def main_file(path: Path) -> Path:
    """``path`` itself, or for a directory (``-c /etc/sweeperd``) the ``sweeperd.toml`` in it."""
    return path / MAIN_FILE if path.is_dir() else path


def dropin_files(main: Path, problems: list[str]) -> list[Path]:
    """The drop-ins of ``main`` in the order they are merged; problems (an unreadable
    ``conf.d``, a drop-in that cannot be looked at) go to ``problems``. No conf.d: none."""
    directory = main.parent / CONF_D
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        problems.append(f"{directory}: expected a directory of *{SUFFIX} drop-ins")
        return []
    except OSError as exc:
        problems.append(f"{directory}: cannot read the drop-in directory: {_reason(exc)}")
        return []
    out: list[Path] = []
    for entry in sorted(entries, key=lambda e: os.fsencode(e.name)):
        if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
            continue
        path = directory / entry.name
        try:
            # Followed: a symbolic link to a file is a drop-in (alternatives, packaging); one that
            # points nowhere is reported, since the tenants in it would silently be missing.
            mode = os.stat(path).st_mode
        except OSError as exc:
            problems.append(f"{path}: cannot read the drop-in: {_reason(exc)}")
            continue
        if stat.S_ISREG(mode):  # not a directory, and never a FIFO that would block a read
            out.append(path)
    return out


def read_merged(path: Path) -> Merged:
    """Read ``path`` (a file, or a directory holding ``sweeperd.toml``) and its drop-ins."""
    problems: list[str] = []
    if path.is_dir() and not (path / MAIN_FILE).exists():
        problems.append(
            f"{path}: cannot read the configuration: a directory without {MAIN_FILE} "
            f"(expected {path / MAIN_FILE}, and drop-ins in {path / CONF_D}/*{SUFFIX})"
        )
        return Merged({}, Origins((path,)), problems, complete=False)
    main = main_file(path)
    doc = _read(main, problems)
    if doc is None:
        # Without the main file a merge of the others would only report what it lacks.
        return Merged({}, Origins((main,)), problems, complete=False)
    files = [main]
    root = _Node(0)
    listed = dropin_files(main, problems)
    complete = not problems
    for dropin in listed:
        more = _read(dropin, problems)
        if more is None:
            complete = False
            continue
        files.append(dropin)
        _merge(doc, root, more, len(files) - 1, "", files, problems)
    return Merged(doc, Origins(tuple(files), root), problems, complete)


def _read(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """One file's TOML document, or None (the reason in ``problems``, naming the file)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read the configuration: {_reason(exc)}")
        return None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path}: invalid TOML: {exc}")
    return None


def _merge(
    into: dict[str, Any],
    node: _Node,
    new: dict[str, Any],
    file: int,
    where: str,
    files: list[Path],
    problems: list[str],
) -> None:
    """Merge the table ``new`` of ``files[file]`` into ``into`` (at key path ``where``)."""
    for key, value in new.items():
        if key not in into:
            into[key] = value
            if file != node.file:
                node.child(key).file = file
            continue
        old = into[key]
        if isinstance(old, dict) and isinstance(value, dict):
            _merge(old, node.child(key), value, file, _key(where, key), files, problems)
        elif _tables(old) and _tables(value):
            items = node.child(key)
            if items.runs is None:
                items.runs = [(0, items.file)]
            items.runs.append((len(old), file))
            old.extend(value)  # every list here is one a file's parse made: ours to extend
        else:
            first = node.keys.get(key) if node.keys is not None else None
            owner = files[first.file if first is not None else node.file]
            kinds = (_kind(old), _kind(value))
            clash = "" if kinds[0] == kinds[1] else f" ({kinds[0]} there, {kinds[1]} here)"
            problems.append(f"{files[file]}: {_key(where, key)}: already set in {owner}{clash}")


def _tables(value: Any) -> bool:
    """An array of tables: what appends. An empty array is a plain value (nothing says what
    it would hold), so it is set once like any other."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _kind(value: Any) -> str:
    return "an array of tables" if _tables(value) else kind_of(value)


def _key(where: str, key: str) -> str:
    return f"{where}.{toml_key(key)}" if where else toml_key(key)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
