"""
How a script reads as a lecture: its length, `#` comments per line of code (docstrings and blank lines are not
code), the same inside the training loop, its longest function, and the line where the training loop starts.

    python bench/lecture_metrics.py train_gpt2.py            # the loop: the first `for step in ...` statement
    python bench/lecture_metrics.py other.py --loop_line 376  # another file: say where its loop starts
"""

import argparse
import ast
import io
import tokenize


def measure(path, loop_line=None):
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    docstrings = set()  # lines that belong to a docstring
    functions = []  # (length in lines, name)
    loop = None  # (first line, last line) of the training loop
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append((node.end_lineno - node.lineno + 1, node.name))
        if isinstance(node, ast.For) and (loop_line == node.lineno or (loop_line is None and loop is None and
                                                                         getattr(node.target, "id", "") == "step")):
            loop = (node.lineno, node.end_lineno)
    comments, code = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = comments.get(tok.start[0], 0) + 1
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    code -= docstrings
    in_loop = lambda n: loop and loop[0] <= n <= loop[1]  # noqa: E731
    per = lambda lines, cmts: cmts / max(1, len(lines))  # noqa: E731
    length, name = max(functions)
    lines = src.splitlines()
    # sections: a "# ====" rule followed by "# <title>"; the comments per code line of each
    starts = [(i + 2, lines[i + 1].lstrip("# ")[:40]) for i in range(len(lines) - 1)
              if lines[i].startswith("# ====") and lines[i + 1].startswith("# ")]
    sections = {}
    for (first, title), (end, _) in zip(starts, starts[1:] + [(len(lines) + 1, None)]):
        part = {n for n in code if first <= n < end}
        sections[f"  {title} (line {first - 1})"] = round(per(part, sum(c for n, c in comments.items()
                                                                         if first <= n < end)), 2)
    return {
        "lines": len(src.splitlines()),
        "code lines": len(code),
        "comments per code line": round(per(code, sum(comments.values())), 2),
        "in the training loop": round(per({n for n in code if in_loop(n)},
                                          sum(c for n, c in comments.items() if in_loop(n))), 2) if loop else None,
        "longest function": f"{name}() {length} lines",
        "training loop starts at line": loop[0] if loop else None,
        **({"comments per code line by section": ""} if sections else {}), **sections,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--loop_line", type=int, default=None, help="line of the training loop's `for` statement")
    args = p.parse_args()
    for k, v in measure(args.path, args.loop_line).items():
        print(f"{k:30s} {v}")


if __name__ == "__main__":
    main()
