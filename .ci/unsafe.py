#!/usr/bin/env python3
"""`unsafe` only where src/lib.rs says it may be ("## Where `unsafe` may be": one path per line, a
file or a folder ending in /). The crate denies `unsafe_code`, so a module must opt in with
`#![allow(unsafe_code)]`, and its child modules inherit that: this check is what keeps an `unsafe`
block out of a child the list does not name (the ring's step files, say). Prints the count per
file; exits 1 on an `unsafe` (block, fn, impl or the opt-in) anywhere else.

    python3 .ci/unsafe.py
"""
import pathlib
import re
import sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
lib = (src / "lib.rs").read_text()
section = lib.split("//! ## Where `unsafe` may be", 1)
if len(section) != 2:
    sys.exit("src/lib.rs has no \"## Where `unsafe` may be\" section")
allowed = []
for line in section[1].splitlines()[1:]:
    if not line.startswith("//!"):
        break  # the end of the crate's doc
    line = line.removeprefix("//!").strip()
    if line.startswith("##"):
        break  # the next section
    if line.startswith("- `"):
        allowed.append(line[3:].split("`", 1)[0])
if not allowed:
    sys.exit("src/lib.rs names no module that may hold unsafe")

token = re.compile(r"\bunsafe\s*(\{|fn\b|impl\b|extern\b)|allow\(unsafe_code\)")
counts, bad = {}, []
for p in sorted(src.rglob("*.rs")):
    rel = p.relative_to(src).as_posix()
    text = re.sub(r"//[^\n]*", "", p.read_text())  # comments and docs may say "unsafe"
    n = len(token.findall(text))
    if not n:
        continue
    counts[rel] = n
    if not any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in allowed):
        bad.append(rel)
for rel, n in counts.items():
    print(f"{n:4d}  {rel}")
print(f"{sum(counts.values()):4d}  in all ({len(counts)} files); allowed: {', '.join(allowed)}")
if bad:
    print("FAIL: unsafe outside the modules src/lib.rs allows it in: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
