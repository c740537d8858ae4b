"""The project's modules import one way: no file imports, at any depth or time (top level or inside a
function), a file that imports it. Checked on the source (every import statement, wherever it is) and once at
run time, where a cycle through `python train_gpt2.py` shows as a second copy of train_gpt2 in sys.modules."""
import ast
import subprocess
import sys

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(name):
    """The project modules that name's source imports anywhere (module level or inside functions)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_no_module_imports_one_that_imports_it():
    graph = {m: project_imports(m) for m in MODULES}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])

    cycles = [m for m in MODULES if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_the_program_is_loaded_once_whatever_the_subcommand(tmp_path):
    # `plot` reaches train_extras; before the imports ran one way it imported train_gpt2 again (as a module
    # beside __main__), so every class existed twice
    code = ("import runpy, sys; sys.argv = ['train_gpt2.py', 'plot', '--help']\n"
            "try:\n    runpy.run_path('train_gpt2.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in %r))" % (MODULES,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train_gpt2" not in out.stdout.strip().splitlines()[-1], out.stdout
