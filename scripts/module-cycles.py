#!/usr/bin/env python3
"""Fails when the modules of a crate's src/ import each other in a circle.

Every `crate::<module>` a file names outside its #[cfg(test)] section and its comments counts
as an import (`use crate::x` lines, `use crate::{a, b}` groups and inline paths alike). Usage:
    scripts/module-cycles.py comet/src [-v]      (-v prints the whole graph)
"""
import os
import re
import sys

src = sys.argv[1]
verbose = "-v" in sys.argv[2:]
mods = {f[:-3] for f in os.listdir(src) if f.endswith(".rs") and f != "main.rs"}
graph = {}
for m in sorted(mods):
    with open(os.path.join(src, m + ".rs")) as fh:
        text = fh.read()
    cut = re.search(
        r"^#\[cfg\(test\)\]\s*\n(#\[[^\n]*\]\s*\n)*(pub(\(crate\))? )?mod ", text, re.M
    )
    if cut:
        text = text[: cut.start()]
    # Doc links and comments name modules without importing them.
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    refs = set(re.findall(r"\bcrate::([a-z_]+)", text))
    for grp in re.findall(r"use crate::\{([^}]*)\}", text):
        refs |= {g.strip().split("::")[0] for g in grp.split(",") if g.strip()}
    graph[m] = sorted((refs & mods) - {m})

if verbose:
    for m, deps in graph.items():
        print(f"{m:12} -> {', '.join(deps) if deps else '(none)'}")

state, stack, cycles = {}, [], []


def dfs(u):
    state[u] = 1
    stack.append(u)
    for v in graph.get(u, []):
        if state.get(v) == 1:
            cycles.append(stack[stack.index(v):] + [v])
        elif v not in state:
            dfs(v)
    stack.pop()
    state[u] = 2


for m in graph:
    if m not in state:
        dfs(m)
for c in cycles:
    print(f"layout: modules of {src} import each other in a circle: {' -> '.join(c)}", file=sys.stderr)
sys.exit(1 if cycles else 0)
