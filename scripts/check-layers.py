#!/usr/bin/env python3
"""Print audiocap's module dependency graph; fail on a cycle or an upward arrow.

Two graphs are read from the source:
  - between the crate's top-level modules (`src/<module>/` or `src/<module>.rs`,
    with `src/main.rs` as the binary on top), checked against the layer order
    written in `src/lib.rs` between the `layers:begin` and `layers:end` markers
    (one layer per line, highest first; a module may only use modules in lower
    layers, or in its own layer when the line says so with `(peers)`);
  - between the files of each top-level module, which must have no cycle.

A dependency is any path that names a module: `crate::x`, `super::x`, `self::x`,
`audiocap::x` (from main.rs), in `use` items and in expressions alike. Test-only
code (`#[cfg(test)] mod tests { ... }` at the end of a file, and `src/test_util.rs`)
is left out: tests may reach across layers.

Usage: scripts/check-layers.py [--quiet] [--src DIR]
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
if "--src" in sys.argv:
    SRC = Path(sys.argv[sys.argv.index("--src") + 1]).resolve()

PATH_RE = re.compile(r"\b(crate|super|self|audiocap)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self|audiocap)::\{([^;]*)\};", re.S)


def strip_comments_and_strings(text: str) -> str:
    """The code with comments removed and string/char literals emptied (one pass)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif (m := re.compile(r"b?r(#*)\"").match(text, i)) and not (
            i and (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            close = '"' + m.group(1)
            j = text.find(close, m.end())
            i = n if j < 0 else j + len(close)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and (m := re.compile(r"'(?:\\[^']{1,10}|[^'\\])'").match(text, i)):
            i = m.end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_test_module(text: str) -> str:
    """Drop a trailing `#[cfg(test)] mod name { ... }` (the repository's convention)."""
    m = re.search(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod\s+\w+\s*\{", text)
    if m:
        return text[: m.start()]
    return text


BINARY_DIRS = ("cli",)  # modules of the binary (`mod cli;` in main.rs), not the library


def in_binary(file: Path) -> bool:
    parts = file.relative_to(SRC).parts
    return parts == ("main.rs",) or parts[0] in BINARY_DIRS


def module_path(file: Path) -> list[str]:
    """The module a file is, as a path from the library root; the binary's modules
    are under a `main` root of their own."""
    rel = file.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        return []
    if parts == ["main"]:
        return ["main"]
    if in_binary(file):
        return ["main"] + parts
    return parts


def is_dir_module(file: Path) -> bool:
    return file.name == "mod.rs" or file.name in ("lib.rs", "main.rs")


def resolve(file: Path, root: str, rest: list[str]) -> list[str] | None:
    """Absolute module path (within the crate) that a path names, or None."""
    here = module_path(file)
    if root == "audiocap":
        return rest if in_binary(file) else None
    if root == "crate":
        return ["main"] + rest if in_binary(file) else rest
    # For a file module `a/b.rs`, `self` is a::b and `super` is a; for `a/mod.rs`
    # `self` is a and `super` is the crate root.
    base = list(here)
    if root == "super":
        base = base[:-1]
    return base + rest


def references(file: Path) -> set[tuple[str, ...]]:
    text = strip_test_module(strip_comments_and_strings(file.read_text()))
    found: set[tuple[str, ...]] = set()
    for m in USE_GROUP_RE.finditer(text):
        root = m.group(1)
        for item in re.split(r",(?![^{]*\})", m.group(2)):
            item = item.strip()
            if not item:
                continue
            names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", item.split("{")[0])
            if names:
                target = resolve(file, root, names[:2])
                if target is not None:
                    found.add(tuple(target))
    for m in PATH_RE.finditer(text):
        rest = m.group(2).split("::")[1:]
        target = resolve(file, m.group(1), rest)
        if target is not None:
            found.add(tuple(target))
    return found


def known_modules() -> dict[tuple[str, ...], Path]:
    mods = {}
    for f in SRC.rglob("*.rs"):
        mods[tuple(module_path(f))] = f
    return mods


REEXPORT_RE = re.compile(r"\bpub(?:\([^)]*\))?\s+use\s+(?:self::)?([a-z_][a-z0-9_]*)::(\{[^;]*\}|[A-Za-z_][A-Za-z0-9_]*)\s*;")


def reexports(mods) -> dict[tuple[str, ...], tuple[str, ...]]:
    """`(module, Name)` → the child module a `pub use child::Name` in its mod.rs takes it
    from, so a path through a re-export counts as a use of the file that defines it."""
    out = {}
    for path, file in mods.items():
        if not is_dir_module(file) or file.name == "main.rs":
            continue
        text = strip_comments_and_strings(file.read_text())
        for m in REEXPORT_RE.finditer(text):
            child = tuple(path) + (m.group(1),)
            if child not in mods:
                continue
            for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", m.group(2).replace(" as ", " ")):
                out[tuple(path) + (name,)] = child
    return out


def owning_module(path: tuple[str, ...], mods, exports) -> tuple[str, ...]:
    """The module that defines what `path` names: the longest known module that is a
    prefix of it, followed through re-exports."""
    for n in range(len(path), -1, -1):
        if path[:n] in mods:
            if n < len(path) and path[: n + 1] in exports:
                return owning_module(exports[path[: n + 1]] + path[n + 1 :], mods, exports)
            return path[:n]
    return ()


def read_layers() -> list[tuple[list[str], bool]]:
    lib = (SRC / "lib.rs").read_text()
    m = re.search(r"layers:begin\n(.*?)//!\s*layers:end", lib, re.S)
    if not m:
        sys.exit("src/lib.rs has no `layers:begin` … `layers:end` block")
    layers = []
    for line in m.group(1).splitlines():
        line = line.strip().removeprefix("//!").strip().strip("`").strip()
        if not line:
            continue
        peers = "(peers)" in line
        line = line.replace("(peers)", "")
        names = [n for n in re.split(r"[\s,]+", line) if n]
        layers.append((names, peers))
    return layers


def find_cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def readme_problems(mods) -> list[str] | None:
    """What the README's Layout block leaves out: every top-level module (and the
    binary's `main.rs` and `cli/`) needs its line (`  name/` or `  name.rs`), and every
    file of a folder module its name among that module's lines. None when there is
    no README beside `src/`."""
    readme = SRC.parent / "README.md"
    if not readme.is_file():
        return None
    m = re.search(r"^## Layout\n.*?```\n(.*?)```", readme.read_text(), re.S | re.M)
    if not m:
        return ["README.md has no Layout block (## Layout with a ``` tree)"]
    lines = m.group(1).splitlines()
    entries: dict[str, set[str]] = {"main.rs": set()}
    for path, file in mods.items():
        if not path or path == ("test_util",) or path == ("main",):
            continue
        lib_path = path[1:] if path[0] == "main" else path
        if len(lib_path) == 1:
            entries.setdefault(lib_path[0] + ("/" if is_dir_module(file) else ".rs"), set())
        else:
            entries.setdefault(lib_path[0] + "/", set()).add(lib_path[1])
    problems = []
    for entry, files in sorted(entries.items()):
        start = next(
            (i for i, line in enumerate(lines) if re.match(rf"^  {re.escape(entry)}(\s|$)", line)),
            None,
        )
        if start is None:
            problems.append(f"README Layout: no line for src/{entry}")
            continue
        end = start + 1
        while end < len(lines) and not re.match(r"^ {0,2}\S", lines[end]):
            end += 1
        block = "\n".join(lines[start:end])
        for f in sorted(files):
            if not re.search(rf"\b{re.escape(f)}\b", block):
                problems.append(f"README Layout: src/{entry}{f}.rs is not named under src/{entry}")
    return problems


def main() -> int:
    quiet = "--quiet" in sys.argv
    mods = known_modules()
    exports = reexports(mods)
    top_edges: dict[str, set[str]] = {}
    file_edges: dict[str, dict[str, set[str]]] = {}
    for path, file in sorted(mods.items()):
        if not path or path == ("test_util",):
            continue
        top = path[0]
        for ref in references(file):
            target = owning_module(ref, mods, exports)
            if not target or target == ("test_util",):
                continue
            if target[0] != top:
                top_edges.setdefault(top, set()).add(target[0])
            else:
                # The files of a module, one level down (the binary's: two, under cli/).
                depth = 3 if top == "main" else 2
                if len(path) < depth or len(target) < depth or target[:depth] == path[:depth]:
                    continue
                a, b = "/".join(path[:depth]), "/".join(target[:depth])
                file_edges.setdefault(top, {}).setdefault(a, set()).add(b)

    layers = read_layers()
    rank = {}
    peers_ok = {}
    for i, (names, peers) in enumerate(layers):
        for n in names:
            rank[n] = i
            peers_ok[n] = peers

    problems = []
    tops = sorted({p[0] for p in mods if p and p != ("test_util",)})
    for t in tops:
        if t not in rank:
            problems.append(f"module `{t}` is in no layer of src/lib.rs")

    if not quiet:
        print("layers (src/lib.rs), highest first:")
        for names, peers in layers:
            print("  " + ", ".join(names) + ("  (peers)" if peers else ""))
        print("\nmodule → what it uses:")
    for a in tops:
        uses = sorted(top_edges.get(a, ()))
        if not quiet:
            print(f"  {a:10} → {', '.join(uses) if uses else '-'}")
        for b in uses:
            if a not in rank or b not in rank:
                continue
            if rank[b] < rank[a] or (rank[b] == rank[a] and not peers_ok[a]):
                problems.append(f"`{a}` uses `{b}`, which is not below it")

    for comp in find_cycles(tops, top_edges):
        problems.append("module cycle: " + " ↔ ".join(comp))
    for top, edges in sorted(file_edges.items()):
        nodes = set(edges) | {b for bs in edges.values() for b in bs}
        if not quiet and edges:
            print(f"\nwithin {top}/:")
            for a in sorted(edges):
                print(f"  {a} → {', '.join(sorted(edges[a]))}")
        for comp in find_cycles(nodes, edges):
            problems.append("file cycle: " + " ↔ ".join(comp))

    layout = readme_problems(mods)
    if layout is not None:
        problems.extend(layout)
        if not quiet and not layout:
            print("\nREADME Layout: every module and file named")

    if problems:
        print("\nproblems:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    if not quiet:
        print("\nno cycles; every arrow points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
