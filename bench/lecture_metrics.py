"""
How a script reads as a lecture: its weight in bytes, its lines and widest line, `#` comments per
line of code (docstrings and blank lines are not code), the same inside the training loop and in
each section, its longest function, and the line where the training loop starts.

    python bench/lecture_metrics.py
        # every product file: bytes, lines, widest, comments
    python bench/lecture_metrics.py train_gpt2.py
        # one file in detail (the loop: `for step in ...`)
    python bench/lecture_metrics.py other.py --loop_line 376
        # another file: where its loop starts
"""

import argparse
import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what issue 33 asks of the product files: the lecture's weight, every file's width, a module's size
LECTURE_BYTES, WIDTH, MODULE_BYTES, MODULE_LINES = 40_000, 100, 25_000, 400
LECTURE_IMPORTS = 12  # issue 39: the plumbing modules the lecture may import


def product_files():
    """The program's own files: the lecture, its companions and the plumbing package."""
    return [ROOT / "train_gpt2.py", ROOT / "fineweb.py", ROOT / "hellaswag.py",
            *sorted((ROOT / "plumbing").glob("*.py"))]


def measure(path, loop_line=None):
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    docstrings = set()  # lines that belong to a docstring
    functions = []  # (length in lines, name)
    loop = None  # (first line, last line) of the training loop
    plumbing = set()  # the plumbing modules it imports
    for node in ast.walk(tree):
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append((node.end_lineno - node.lineno + 1, node.name))
        if isinstance(node, ast.ImportFrom) and node.module == "plumbing":
            plumbing.update(a.name for a in node.names)
        if isinstance(node, ast.For) and (loop_line == node.lineno or (
                loop_line is None and loop is None and getattr(node.target, "id", "") == "step")):
            loop = (node.lineno, node.end_lineno)
    comments, code = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = comments.get(tok.start[0], 0) + 1
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    code -= docstrings
    in_loop = lambda n: loop and loop[0] <= n <= loop[1]  # noqa: E731
    per = lambda lines, cmts: cmts / max(1, len(lines))  # noqa: E731
    length, name = max(functions, default=(0, "none"))
    lines = src.splitlines()
    # sections: a "# ====" rule followed by "# <title>"; the comments per code line of each
    starts = [(i + 2, lines[i + 1].lstrip("# ")[:40]) for i in range(len(lines) - 1)
              if lines[i].startswith("# ====") and lines[i + 1].startswith("# ")]
    sections = {}
    for (first, title), (end, _) in zip(starts, starts[1:] + [(len(lines) + 1, None)]):
        part = {n for n in code if first <= n < end}
        sections[f"  {title} (line {first - 1})"] = round(
            per(part, sum(c for n, c in comments.items() if first <= n < end)), 2)
    return {
        "bytes": len(src.encode()),
        "lines": len(src.splitlines()),
        "widest line": max((len(line) for line in lines), default=0),
        "code lines": len(code),
        "comments per code line": round(per(code, sum(comments.values())), 2),
        "in the training loop": round(per({n for n in code if in_loop(n)}, sum(
            c for n, c in comments.items() if in_loop(n))), 2) if loop else None,
        "longest function": f"{name}() {length} lines",
        "plumbing modules imported": len(plumbing),
        "training loop starts at line": loop[0] if loop else None,
        **({"comments per code line by section": ""} if sections else {}), **sections,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", help="one file in detail; none: every product file")
    p.add_argument("--loop_line", type=int, default=None,
                   help="line of the training loop's `for` statement")
    args = p.parse_args()
    if args.path:
        for k, v in measure(args.path, args.loop_line).items():
            print(f"{k:30s} {v}")
        return
    print(f"{'file':28s} {'bytes':>7s} {'lines':>6s} {'widest':>6s}  comments per code line")
    total = 0
    for path in product_files():
        m = measure(path)
        total += m["bytes"]
        print(f"{str(path.relative_to(ROOT)):28s} {m['bytes']:7,d} {m['lines']:6d} "
              f"{m['widest line']:6d}  {m['comments per code line']}")
    print(f"{'all':28s} {total:7,d}   (bounds: the lecture {LECTURE_BYTES:,} bytes, every line "
          f"{WIDTH} columns, a module {MODULE_BYTES:,} bytes and ~{MODULE_LINES} lines)")


if __name__ == "__main__":
    main()
