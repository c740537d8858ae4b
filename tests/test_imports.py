"""The project's modules import one way: no module imports, at any depth or time (top level or inside a
function), a module that imports it. Checked on the source (every import statement, wherever it is) and once at
run time, where a cycle through `python train_gpt2.py` shows as a second copy of train_gpt2 in sys.modules."""
import ast
import subprocess
import sys

from conftest import ROOT

PLUMBING = sorted(f"plumbing.{p.stem}" for p in (ROOT / "plumbing").glob("*.py") if p.stem != "__init__")
MODULES = sorted(p.stem for p in ROOT.glob("*.py")) + PLUMBING


def source(name):
    return ROOT / (name.replace(".", "/") + ".py")


def project_imports(name):
    """The project modules that name's source imports anywhere (module level or inside functions)."""
    tree = ast.parse(source(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names} | {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module.split(".")[0]} | {f"{node.module}.{a.name}" for a in node.names}
    return found & set(MODULES) - {name}


def test_no_module_imports_one_that_imports_it():
    graph = {m: project_imports(m) for m in MODULES}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph[start])

    cycles = [m for m in MODULES if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_the_plumbing_never_imports_the_programs():
    # the package is a library under the programs: train_gpt2.py, hellaswag.py and fineweb.py import it, never
    # the other way round (a lazy import inside a function included)
    programs = {p.stem for p in ROOT.glob("*.py")}
    assert {m: project_imports(m) & programs for m in PLUMBING} == {m: set() for m in PLUMBING}


def test_the_packages_index_lists_every_module_below_what_it_imports():
    # plumbing/__init__.py lists the modules from the bottom up: each imports only those above it
    import re
    listed = re.findall(r"^    (\w+)  +\S", (ROOT / "plumbing" / "__init__.py").read_text(), re.M)
    assert sorted(listed) == sorted(m.split(".")[1] for m in PLUMBING), listed
    for i, name in enumerate(listed):
        below = {f"plumbing.{m}" for m in listed[i:]}
        assert not project_imports(f"plumbing.{name}") & below, (name, project_imports(f"plumbing.{name}"))


def test_the_program_is_loaded_once_whatever_the_subcommand(tmp_path):
    # `plot` reaches the plumbing's plot module; before the imports ran one way it imported train_gpt2 again (as
    # a module beside __main__), so every class existed twice
    code = ("import runpy, sys; sys.argv = ['train_gpt2.py', 'plot', '--help']\n"
            "try:\n    runpy.run_path('train_gpt2.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in %r))" % (MODULES,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train_gpt2" not in out.stdout.strip().splitlines()[-1], out.stdout
