#!/usr/bin/env python3
"""The top-level module graph of src/: fails on a cycle, and when an import breaks the order documented
in src/lib.rs ("## Import order": numbered lines of modules; each imports only from lines below it) or
that list misses or repeats a module.

A top-level module is src/X.rs or src/X/ (its children count as X). An arrow A -> B means a file of A
names `crate::B` (in a `use`, a grouped `use crate::{B, ...}`, or a path). Unit tests (`#[cfg(test)]
mod tests { ... }` to the end of a file) may reach anywhere and are left out. `main.rs`, `lib.rs` and
`bin/` (other binaries) are roots, not modules.

    python3 .ci/modgraph.py            # prints the layers, exits 1 on a cycle
    python3 .ci/modgraph.py --dot      # the graph in Graphviz form
"""
import pathlib
import re
import sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
mods = {}
for p in sorted(src.rglob("*.rs")):
    top = p.relative_to(src).parts[0].removesuffix(".rs")
    if top not in ("main", "lib", "bin"):  # the roots, and the other binaries (not modules)
        mods.setdefault(top, []).append(p)

path_ref = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
group_ref = re.compile(r"\buse\s+crate::\{([^}]*)\}", re.S)
tests = re.compile(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod tests\s*\{.*", re.S)
edges = {m: set() for m in mods}
for m, files in mods.items():
    for f in files:
        text = tests.sub("", f.read_text())
        text = re.sub(r"//[^\n]*", "", text)  # comments name modules without importing them
        names = set(path_ref.findall(text))
        for g in group_ref.findall(text):
            names |= {x.strip().split("::")[0] for x in g.split(",") if x.strip()}
        edges[m] |= {n for n in names if n in mods and n != m}

if "--dot" in sys.argv:
    print("digraph modules {")
    for a in sorted(edges):
        for b in sorted(edges[a]):
            print(f"  {a} -> {b};")
    print("}")
    sys.exit(0)

# Strongly connected components (Tarjan).
index, low, on, stack, comps = {}, {}, set(), [], []
counter = [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
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
        comps.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in index:
        visit(v)
cycles = [c for c in comps if len(c) > 1]
if cycles:
    for c in cycles:
        inner = [f"{a} -> {b}" for a in c for b in sorted(edges[a]) if b in c]
        print(f"CYCLE between {len(c)} modules: {' '.join(c)}\n  " + "\n  ".join(inner))
    sys.exit(1)

# The documented order (src/lib.rs): line number of each module; each may import only later lines.
doc = (src / "lib.rs").read_text()
section = doc.split("## Import order", 1)[1] if "## Import order" in doc else ""
order = {}
problems = []
for m in re.finditer(r"^//! (\d+)\. (.*)$", section, re.M):
    for name in re.findall(r"`([a-z_][a-z0-9_]*)`", m.group(2)):
        if name in order:
            problems.append(f"{name} is listed twice in src/lib.rs's import order")
        order[name] = int(m.group(1))
for m in sorted(mods):
    if m not in order:
        problems.append(f"{m} is missing from src/lib.rs's import order")
for m in sorted(order):
    if m not in mods:
        problems.append(f"src/lib.rs's import order names {m}, which is not a module")
for a in sorted(edges):
    for b in sorted(edges[a]):
        if a in order and b in order and order[b] <= order[a]:
            problems.append(f"{a} (line {order[a]}) imports {b} (line {order[b]}): not below it")
if problems:
    print("The documented import order (src/lib.rs) is not what the code does:")
    for p in problems:
        print(f"  {p}")
    sys.exit(1)

# Layers: a module's layer is one above the highest module it imports.
layer = {}


def depth(m):
    if m not in layer:
        layer[m] = 1 + max((depth(d) for d in edges[m]), default=-1)
    return layer[m]


for m in mods:
    depth(m)
imports = sum(map(len, edges.values()))
print(f"{len(mods)} top-level modules, {imports} imports, no cycle, in the documented order. Layers, top first:")
for d in range(max(layer.values()), -1, -1):
    print(f"  {d}: {' '.join(sorted(m for m in mods if layer[m] == d))}")
