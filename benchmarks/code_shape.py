"""The shape of the tunelab source tree, so that a refactor can quote before/after numbers.

Measured with the standard library only (`ast`, `tokenize`), no import of tunelab:
1. Function sizes: every function and method, nested ones included, from its `def` line to the last line of
   its body (docstring and nested functions included); the longest ten, how many exceed 60 lines, and the
   length of `train` and of the same-module functions it calls (where its loop lives).
2. Task-name string comparisons outside `<src>/tasks/`: `==`/`!=` against a task-name string, `in`/`not in`
   a literal tuple/list/set of task names, a dict literal of two or more keys that are all task names, and
   `match` cases on a task name. Each Compare node, dict literal or case counts once. "text" is also a
   column and an event name, so a comparison whose only task name is "text" counts only when the other
   side mentions "task" (`task`, `opts.task`, `meta["task"]`...); the ones left out are counted apart.
3. Imports among tunelab modules: module-level imports (those under `if TYPE_CHECKING:` apart) and
   function-local ones; cycles (strongly connected components of more than one module, or self-loops)
   among module-level imports, and with the local ones added. An import edge goes to the most specific
   module named (`from tunelab.train import loop` -> tunelab.train.loop), not to the parent packages.
   Layer violations: any import of tunelab.train or tunelab.serve from a lower layer (tasks, evaluate, models,
   data, assets): the layering rule is that lower layers never import train/ or serve/.
   Function-local imports of any package (an `import` / `from ... import` statement anywhere inside a def), and
   those without a reason. The rule is that a local import keeps start-up fast or breaks a cycle, and says which;
   one has a reason when (a) a `#` comment is on one of its lines, (b) a line holding only a comment is just
   above it, or just above the run of consecutive import statements it belongs to (blank lines between them
   allowed), or (c) a module-level comment (comment lines starting in column 0, consecutive ones read as one)
   says "imported inside" and names the imported module or a package above it (`torch` covers
   `torch.distributed.tensor`; the project package alone, `tunelab`, covers nothing). Counted per file.
4. Comment share: lines holding a `#` comment, and those plus docstring lines, over the non-blank lines;
   and the public functions without a docstring in serve, tasks and methods (module-level functions and
   methods of public classes whose names do not start with an underscore).

`--rev` reads the tree at a git revision instead of the working tree, so a baseline can be recomputed.
Writes benchmarks/results/code_shape.json unless `--out` says otherwise.

    python benchmarks/code_shape.py [--src src/tunelab] [--rev HEAD] [--out benchmarks/results/code_shape.json]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402

TASK_NAMES = frozenset({"classification", "token_classification", "causal_lm", "sft", "text", "ner"})
AMBIGUOUS = "text"
LONG = 60
LOWER_LAYERS = ("tasks", "evaluate", "models", "merge", "data", "assets", "registry", "ensemble", "rag")
UPPER_LAYERS = ("train", "serve", "export", "monitor", "tune", "recommend")
DOCSTRING_DIRS = ("serve", "tasks", "methods")
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def git(src: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(src), *args], check=True, capture_output=True, text=True).stdout


def read_tree(src: Path, rev: str | None) -> dict[str, str]:
    """Source text of every .py file under `src`, keyed by its path relative to `src` (POSIX)."""
    if rev is None:
        return {p.relative_to(src).as_posix(): p.read_text(encoding="utf-8") for p in sorted(src.rglob("*.py"))
                if "__pycache__" not in p.parts}
    prefix = git(src, "rev-parse", "--show-prefix").strip()
    names = git(src, "ls-tree", "-r", "--name-only", "--full-tree", rev, "--", prefix).split("\n")
    return {n[len(prefix):]: git(src, "show", f"{rev}:{n}") for n in sorted(names) if n.endswith(".py")}


def module_name(pkg: str, rel: str) -> str:
    parts = [pkg, *rel[:-3].split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Source:
    def __init__(self, pkg: str, rel: str, text: str):
        self.rel, self.name, self.text = rel, module_name(pkg, rel), text
        self.tree = ast.parse(text, filename=rel)
        self.is_package = rel.endswith("__init__.py")


# 1. Function sizes -----------------------------------------------------------------------------------------

def functions(node: ast.AST, prefix: str = ""):
    """(qualified name, def node) of every function under `node`, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (*FUNCS, ast.ClassDef)):
            name = f"{prefix}{child.name}"
            if isinstance(child, FUNCS):
                yield name, child
            yield from functions(child, name + ".")
        else:
            yield from functions(child, prefix)


def function_sizes(mods: list[Source]) -> dict:
    sizes = [(f"{m.name}:{q}", f.end_lineno - f.lineno + 1) for m in mods for q, f in functions(m.tree)]
    longest = sorted(sizes, key=lambda kv: -kv[1])[:10]
    return {"functions": len(sizes), f"over_{LONG}_lines": sum(n > LONG for _, n in sizes),
            "longest": [{"name": k, "lines": n} for k, n in longest], "train": train_sizes(mods, dict(sizes))}


def train_sizes(mods: list[Source], sizes: dict[str, int]) -> dict[str, int]:
    """`train` (module-level, in the train package) and the module-level functions of its module it calls."""
    for m in mods:
        if m.name.split(".")[1:2] != ["train"]:
            continue
        top = {f.name for f in m.tree.body if isinstance(f, FUNCS)}
        for f in m.tree.body:
            if isinstance(f, FUNCS) and f.name == "train":
                called = {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
                return {f"{m.name}:{q}": sizes[f"{m.name}:{q}"] for q in ["train", *sorted(called & top)]}
    return {}


# 2. Task-name comparisons ----------------------------------------------------------------------------------

def task_consts(node: ast.AST) -> set[str]:
    """Task names that `node` is, or that a literal tuple/list/set `node` holds (all its items task names)."""
    if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        names = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
        if all(n in TASK_NAMES for n in names):
            return set(names)
    return set()


def mentions_task(nodes: list[ast.AST]) -> bool:
    return any("task" in ast.unparse(n).lower() for n in nodes)


def task_hits(mod: Source) -> tuple[list[dict], int]:
    """(hits, comparisons left out because their only task name is the ambiguous "text")."""
    hits, skipped = [], 0

    def hit(node: ast.AST, kind: str, names: set[str], others: list[ast.AST]) -> None:
        nonlocal skipped
        if names == {AMBIGUOUS} and not mentions_task(others):
            skipped += 1
        else:
            hits.append({"file": mod.rel, "line": node.lineno, "kind": kind, "names": sorted(names)})

    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = set().union(*(task_consts(o) for o in operands))
            if names:
                hit(node, "compare", names, [o for o in operands if not task_consts(o)])
        elif isinstance(node, ast.Dict) and len(node.keys) > 1:
            names = [k.value if isinstance(k, ast.Constant) else None for k in node.keys]
            if all(n in TASK_NAMES for n in names):
                hits.append({"file": mod.rel, "line": node.lineno, "kind": "dict", "names": sorted(set(names))})
        elif isinstance(node, ast.Match):
            for case in node.cases:
                names = {p.value.value for p in ast.walk(case.pattern) if isinstance(p, ast.MatchValue)
                         and isinstance(p.value, ast.Constant) and p.value.value in TASK_NAMES}
                if names:
                    hit(case.pattern, "match", names, [node.subject])
    return hits, skipped


def task_comparisons(mods: list[Source]) -> dict:
    hits, skipped = [], 0
    for m in mods:
        if not m.rel.startswith("tasks/"):
            found, left_out = task_hits(m)
            hits += found
            skipped += left_out
    hits.sort(key=lambda h: (h["file"], h["line"]))
    return {"count": len(hits), "per_file": dict(Counter(h["file"] for h in hits).most_common()),
            f"{AMBIGUOUS}_only_left_out": skipped, "hits": hits}


# 3. Imports ------------------------------------------------------------------------------------------------

def imported_modules(mod: Source, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The modules an import statement names: `from a.b import c` is a.b.c when that is a known module, else a.b."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = mod.name.split(".")
        parts = parts[:len(parts) - node.level + mod.is_package]  # a package is its own level 1
        base = ".".join([*parts, base] if base else parts)
    return list(dict.fromkeys(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names))


def imports(mod: Source, known: set[str], pkg: str):
    """(target module, line, where) of each import of a tunelab module; where: module, local or type_checking."""

    def target(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, where: str):
        for child in ast.iter_child_nodes(node):
            inner = "local" if isinstance(child, FUNCS) else where
            if isinstance(child, ast.If) and where == "module" and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(ast.Module(body=child.body, type_ignores=[]), "type_checking")
                yield from visit(ast.Module(body=child.orelse, type_ignores=[]), where)
                continue
            if not isinstance(child, (ast.Import, ast.ImportFrom)):
                yield from visit(child, inner)
                continue
            names = imported_modules(mod, child, known)
            for t in dict.fromkeys(target(n) for n in names if n == pkg or n.startswith(pkg + ".")):
                if t:
                    yield t, child.lineno, where

    yield from visit(mod.tree, "module")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules that import themselves (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(out)


def comments(mod: Source) -> dict[int, tokenize.TokenInfo]:
    return {t.start[0]: t for t in tokenize.generate_tokens(io.StringIO(mod.text).readline)
            if t.type == tokenize.COMMENT}


def inside_names(mod: Source, found: dict[int, tokenize.TokenInfo]) -> set[str]:
    """Dotted names in the module-level comments (runs of column-0 comment lines) that say "imported inside"."""
    runs: dict[int, list[str]] = {}  # last line of a run -> its comments
    for line in sorted(n for n, t in found.items() if t.start[1] == 0):
        runs[line] = [*runs.pop(line - 1, []), found[line].string.lstrip("#").strip()]
    texts = [" ".join(run) for run in runs.values()]
    return {name for text in texts if "imported inside" in text.lower() for name in DOTTED.findall(text)}


def local_import_blocks(tree: ast.AST, local: bool = False):
    """(import statement, first statement of its run of consecutive imports) of each function-local import."""
    for _, value in ast.iter_fields(tree):
        if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
            first = None
            for stmt in value:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    first = first or stmt
                    if local:
                        yield stmt, first
                else:
                    first = None
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST) and not isinstance(child, (ast.Import, ast.ImportFrom)):
                yield from local_import_blocks(child, local or isinstance(child, FUNCS))


def local_imports(mods: list[Source], pkg: str) -> dict:
    """Function-local imports of any package, and those without a reason (see the module docstring, 3)."""
    known = {m.name for m in mods}
    total, missing, where = Counter(), Counter(), []
    for m in mods:
        found = comments(m)
        lines = m.text.splitlines()
        named = inside_names(m, found) - {pkg}

        def own_line_comment(n: int) -> bool:
            return n in found and lines[n - 1].lstrip().startswith("#")

        def covered(target: str) -> bool:
            parts = target.split(".")
            return any(".".join(parts[:i]) in named for i in range(1, len(parts) + 1))

        for stmt, first in local_import_blocks(m.tree):
            total[m.rel] += 1
            if any(n in found for n in range(stmt.lineno, stmt.end_lineno + 1)) \
                    or own_line_comment(stmt.lineno - 1) or own_line_comment(first.lineno - 1) \
                    or all(covered(t) for t in imported_modules(m, stmt, known)):
                continue
            missing[m.rel] += 1
            where.append((m.rel, stmt.lineno, ", ".join(imported_modules(m, stmt, known))))
    return {"function_local_imports": sum(total.values()), "function_local_imports_per_file": dict(total.most_common()),
            "function_local_imports_without_reason": sum(missing.values()),
            "function_local_imports_without_reason_per_file": dict(missing.most_common()),
            "function_local_imports_without_reason_at": [f"{f}:{n} {t}" for f, n, t in sorted(where)]}


def in_layer(module: str, pkg: str, layers: tuple[str, ...]) -> bool:
    return any(module == f"{pkg}.{x}" or module.startswith(f"{pkg}.{x}.") for x in layers)


def import_graph(mods: list[Source], pkg: str) -> dict:
    known = {m.name for m in mods}
    module_edges, all_edges = defaultdict(set), defaultdict(set)
    local, type_only, violations = Counter(), 0, []
    for m in mods:
        for t, line, where in imports(m, known, pkg):
            if where == "type_checking":
                type_only += 1
                continue
            all_edges[m.name].add(t)
            if where == "module":
                module_edges[m.name].add(t)
            else:
                local[m.rel] += 1
            if in_layer(m.name, pkg, LOWER_LAYERS) and in_layer(t, pkg, UPPER_LAYERS):
                violations.append({"file": m.rel, "line": line, "imports": t, "where": where})
    return {"module_level_edges": sum(map(len, module_edges.values())), "local_imports": sum(local.values()),
            "local_imports_per_file": dict(local.most_common()), "type_checking_imports": type_only,
            "cycles_module_level": cycles(module_edges), "cycles_with_local": cycles(all_edges),
            "layer_violations": violations, **local_imports(mods, pkg)}


# 4. Comments and docstrings --------------------------------------------------------------------------------

def docstring_nodes(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, *FUNCS)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                yield first


def comment_share(mods: list[Source]) -> dict:
    nonblank = comment = both = 0
    for m in mods:
        lines = {i for i, s in enumerate(m.text.splitlines(), 1) if s.strip()}
        hashes = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(m.text).readline)
                  if t.type == tokenize.COMMENT}
        docs = {i for d in docstring_nodes(m.tree) for i in range(d.lineno, d.end_lineno + 1)}
        nonblank += len(lines)
        comment += len(hashes & lines)
        both += len((hashes | docs) & lines)
    return {"nonblank_lines": nonblank, "comment_lines": comment, "comment_and_docstring_lines": both,
            "comment_share": round(comment / nonblank, 4), "comment_and_docstring_share": round(both / nonblank, 4)}


def public_functions(tree: ast.Module):
    """(qualified name, def node) of module-level public functions and public methods of public classes."""
    for node in tree.body:
        if isinstance(node, FUNCS) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for f in node.body:
                if isinstance(f, FUNCS) and not f.name.startswith("_"):
                    yield f"{node.name}.{f.name}", f


def undocumented(mods: list[Source]) -> dict:
    out = {}
    for d in DOCSTRING_DIRS:
        fns = [(m, q, f) for m in mods if m.rel.startswith(d + "/") for q, f in public_functions(m.tree)]
        missing = [f"{m.rel}:{f.lineno} {q}" for m, q, f in fns if ast.get_docstring(f) is None]
        out[d] = {"public": len(fns), "without_docstring": len(missing), "names": missing}
    return out


# -----------------------------------------------------------------------------------------------------------

def measure(src: Path, rev: str | None) -> dict:
    pkg = src.resolve().name
    mods = [Source(pkg, rel, text) for rel, text in read_tree(src, rev).items()]
    changed = [] if rev else git(src, "status", "--porcelain", "--", ".").splitlines()
    return {"src": git(src, "rev-parse", "--show-prefix").strip().rstrip("/"), "rev": rev or "working tree",
            "commit": git(src, "rev-parse", rev or "HEAD").strip(), "uncommitted_changes": len(changed),
            "files": len(mods), "lines": sum(len(m.text.splitlines()) for m in mods),
            "function_sizes": function_sizes(mods), "task_name_comparisons": task_comparisons(mods),
            "imports": import_graph(mods, pkg), "comments": comment_share(mods),
            "public_without_docstring": undocumented(mods)}


def table(r: dict) -> str:
    fs, tc, im, cm = r["function_sizes"], r["task_name_comparisons"], r["imports"], r["comments"]
    rows = [("source", f"{r['src']} @ {r['rev']} ({r['commit'][:10]}, {r['uncommitted_changes']} uncommitted), "
                       f"{r['files']} files, {r['lines']} lines"),
            ("functions", f"{fs['functions']}, over {LONG} lines: {fs[f'over_{LONG}_lines']}")]
    rows += [("  longest", f"{x['lines']:4d}  {x['name']}") for x in fs["longest"]]
    rows += [("  train", f"{n:4d}  {k}") for k, n in fs["train"].items()]
    rows += [("task-name comparisons", f"{tc['count']} outside tasks/ ({tc[f'{AMBIGUOUS}_only_left_out']} "
                                       f"'{AMBIGUOUS}'-only left out)")]
    rows += [("", f"{n:4d}  {f}") for f, n in tc["per_file"].items()]
    rows += [("imports", f"{im['module_level_edges']} module-level edges, {im['local_imports']} function-local "
                         f"in {len(im['local_imports_per_file'])} files")]
    for key, label in (("cycles_module_level", "cycles (module-level)"), ("cycles_with_local", "cycles (+local)")):
        rows += [(label, " <-> ".join(c) if len(c) > 1 else f"{c[0]} (self)") for c in im[key]] or [(label, "none")]
    rows += [("layer violations", str(len(im["layer_violations"])))]
    rows += [("", f"{v['file']}:{v['line']} -> {v['imports']} ({v['where']})") for v in im["layer_violations"]]
    rows += [("local imports", f"{im['function_local_imports']} function-local (any package) in "
                               f"{len(im['function_local_imports_per_file'])} files, "
                               f"{im['function_local_imports_without_reason']} without a reason")]
    rows += [("", f"{n:4d}  {f} without a reason")
             for f, n in im["function_local_imports_without_reason_per_file"].items()]
    rows += [("comment share", f"{cm['comment_share']:.1%} comments, {cm['comment_and_docstring_share']:.1%} "
                               f"with docstrings, of {cm['nonblank_lines']} non-blank lines")]
    rows += [(f"undocumented public ({d})", f"{x['without_docstring']} of {x['public']}")
             for d, x in r["public_without_docstring"].items()]
    width = max(len(k) for k, _ in rows)
    labels = [k if i == 0 or k != rows[i - 1][0] else "" for i, (k, _) in enumerate(rows)]  # a label once a group
    return "\n".join(f"{k:<{width}}  {v}" for k, (_, v) in zip(labels, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).parent.parent / "src" / "tunelab")
    ap.add_argument("--rev", help="git revision to read instead of the working tree")
    ap.add_argument("--out", type=Path, default=RESULTS / "code_shape.json")
    args = ap.parse_args()
    result = measure(args.src, args.rev)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "code_shape", **result}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
