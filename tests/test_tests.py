"""The suite's own check, on its source: every test can fail. A test function must reach an assertion: an
`assert`, `pytest.raises`/`pytest.fail`/`pytest.warns`, a `raise AssertionError`, or a call to a function of the
tests (in its file, conftest.py or another test file, through any depth of calls) or a fixture it takes that
does. A test that reaches none passes whatever the code does. Switches that turn assertions off (an environment
variable read in a test file) are refused too: a survey of outcomes belongs in bench/."""
import ast

from conftest import ROOT

TESTS = sorted((ROOT / "tests").glob("*.py"))
CHECKS = {"raises", "fail", "warns", "approx_equal", "assert_close", "assert_equal"}  # pytest.*, torch.testing.*


def functions():
    """{name: FunctionDef} of every function defined at any depth in the test files (names may repeat: the
    later wins, which is fine for a yes/no question asked of all of them)."""
    found = {}
    for path in TESTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.setdefault(path.stem, {})[node.name] = node
    return found


def asserts_itself(fn):
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Raise) and "AssertionError" in ast.unparse(node):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CHECKS:
            return True
    return False


def called_names(fn):
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


def test_every_test_reaches_an_assertion():
    by_file = functions()
    every = {name: fn for fns in by_file.values() for name, fn in fns.items()}
    memo = {}

    def reaches(name, seen=()):
        if name in memo:
            return memo[name]
        fn = every.get(name)
        if fn is None or name in seen:
            return False
        args = [a.arg for a in fn.args.args]  # fixtures are taken by name
        memo[name] = asserts_itself(fn) or any(reaches(n, (*seen, name)) for n in called_names(fn) | set(args))
        return memo[name]

    vacuous = [f"{stem}.py::{name}" for stem, fns in by_file.items() for name in fns
               if name.startswith("test_") and not reaches(name)]
    assert not vacuous, f"tests that reach no assertion: {vacuous}"


def test_the_check_finds_a_test_without_an_assertion():
    # the check above, on a test that cannot fail and on its honest twin
    src = "def helper(x):\n    return x\n\ndef test_vacuous():\n    helper(1)\n\ndef test_honest():\n    assert helper(1)\n"
    fns = {n.name: n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    assert not asserts_itself(fns["test_vacuous"]) and called_names(fns["test_vacuous"]) == {"helper"}
    assert not asserts_itself(fns["helper"]) and asserts_itself(fns["test_honest"])


def test_no_switch_turns_a_test_file_s_assertions_off():
    # an environment variable read by a test file could skip its assertions (issue 42: FLAGS_SURVEY did)
    readers = [f"{path.name}:{node.lineno}" for path in TESTS if path.name != "conftest.py"
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv")]
    assert not readers, f"test files that read the environment: {readers}"
