#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a cycle.

A module is a source file (`a/b.rs` or `a/b/mod.rs` is `a::b`). An edge a -> b is a
`crate::b…` or `super::…` path in a's non-test code that names module b (not one of a's own
ancestors, which a module may always use). Cycles are strongly connected components of more than
one module. Usage: check-cycles.py CRATE_SRC_DIR...
"""
import os
import re
import sys


def modules(root):
    found = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["main"], ["lib"]) or rel[0] == "bin":
                continue
            found["::".join(rel)] = os.path.join(dirpath, f)
    return found


def code_of(path):
    text = open(path, encoding="utf-8").read()
    text = text.split("#[cfg(test)]")[0]
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


def resolve(mods, path):
    parts = path.split("::")
    for n in range(len(parts), 0, -1):
        name = "::".join(parts[:n])
        if name in mods:
            return name
    return None


def edges(mods):
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        code = code_of(path)
        parent = m.split("::")[:-1]
        targets = [p for p in re.findall(r"crate::((?:\w+::)*\w+)", code)]
        for prefix, group in re.findall(r"crate::((?:\w+::)*)\{([^}]*)\}", code):
            targets += [prefix + item.strip().split("::")[0].split(" ")[0] for item in group.split(",") if item.strip()]
        if parent:
            targets += ["::".join(parent + [p]) for p in re.findall(r"\bsuper::((?:\w+::)*\w+)", code)]
        for t in targets:
            to = resolve(mods, t)
            if to and to != m and not m.startswith(to + "::"):
                graph[m].add(to)
    return graph


def cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    failed = False
    for root in sys.argv[1:]:
        graph = edges(modules(root))
        for comp in cycles(graph):
            failed = True
            print(f"import cycle in {root}: " + " -> ".join(comp))
            for m in comp:
                print(f"    {m} uses {', '.join(sorted(t for t in graph[m] if t in comp))}")
    if failed:
        print("Break the cycle: move what both sides need into a lower module (see CONTRIBUTING.md).")
        sys.exit(1)


if __name__ == "__main__":
    main()
