"""The PAL sandbox, on real child processes: programs work, escapes fail, the parent is untouched."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import pytest

from agent import sandbox
from agent.sandbox import ExecResult, run_program, run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")


@pytest.mark.parametrize(
    "code, value",
    [
        ("words = 'apple house'.split()\nanswer = ''.join(w[-1] for w in words)", "ee"),
        ("answer = 47 + 38", "85"),
        ("answer = (47 + 38) / 1", "85"),  # integral floats read like integers
        ("answer = 7 / 2", "3.5"),
        ("flips = ['Alice', 'Bob']\nheads = True\nfor _ in flips:\n    heads = not heads\nanswer = heads", "True"),
        ("heads = True\nfor flipper in ['Alice', 'Carol']:\n    heads = not heads\nanswer = 'yes' if heads else 'no'", "yes"),
        ("heads = True\nheads = not heads\nanswer = heads", "False"),
        ("def last(w):\n    return w[-1]\nprint('debug')\nanswer = ''.join(map(last, ['river', 'stone']))", "re"),
        ("total = sum(x for x in range(10) if x % 2)\nanswer = total", "25"),
    ],
)
def test_programs_run(code: str, value: str) -> None:
    assert run_program(code) == ExecResult(ok=True, value=value, error=None)


ESCAPES = {
    "import": "import os\nanswer = os.getcwd()",
    "from_import": "from os import system\nanswer = system('true')",
    "dunder_import": "answer = __import__('os').getcwd()",
    "underscore_name": "_x = 1\nanswer = _x",
    "open": "answer = open('/etc/passwd').read()",
    "subclasses": "answer = ().__class__.__bases__[0].__subclasses__()",
    "getattr": "answer = getattr(getattr((), '__cl' + 'ass__'), 'mro')()",
    "globals": "answer = globals()['__builtins__']",
    "vars": "answer = vars()",
    "exec": "exec('import os')\nanswer = 1",
    "eval": "answer = eval('1 + 1')",
    "compile": "answer = compile('1', 'x', 'eval')",
    "generator_frame": "def g():\n    yield 1\ngen = g()\nanswer = gen.gi_frame.f_back",
    "format_walk": "answer = '{0.__class__.__mro__}'.format(1)",
    "class_def": "class A:\n    pass\nanswer = A",
    "write_file": "f = open('pwned.txt', 'w')\nf.write('x')\nanswer = 1",
    "missing_answer": "x = 1",
    "exception": "answer = 1 / 0",
    "syntax": "answer = (",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escapes_and_errors_fail(name: str) -> None:
    result = run_program(ESCAPES[name])
    assert not result.ok and result.value is None
    assert result.error and len(result.error) <= 200


def test_infinite_loop_times_out_promptly() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass", timeout_s=1.0)
    assert not result.ok and "timeout" in result.error
    assert time.monotonic() - start < 1.0 + 1.5


@pytest.mark.parametrize("code", ["x = 'a' * 10**10\nanswer = 1", "x = [0] * 10**9\nanswer = 1"])
def test_memory_limit(code: str) -> None:
    result = run_program(code, memory_mb=256)
    assert not result.ok and "MemoryError" in result.error


def test_run_programs_in_parallel_keeps_order() -> None:
    codes = ["answer = 1", "while True:\n    pass", "answer = 'b'", "import os"]
    start = time.monotonic()
    results = run_programs(codes, timeout_s=1.0, max_workers=2)
    assert time.monotonic() - start < 1.0 + 2.0
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[0].value == "1" and results[2].value == "b"
    assert run_programs([]) == []


def test_parent_is_unaffected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE")}
    env = dict(os.environ)
    for code in ESCAPES.values():
        run_program(code)
    run_program("x = [0] * 10**9\nanswer = 1")
    assert os.getcwd() == str(tmp_path) and list(tmp_path.iterdir()) == []  # nothing written here
    assert {name: resource.getrlimit(getattr(resource, name)) for name in limits} == limits
    assert dict(os.environ) == env
    assert run_program("answer = 2 + 2").value == "4"  # and it still works


def test_huge_answer_is_rejected_in_the_child() -> None:
    tracemalloc.start()
    try:
        result = run_program("answer = 'x' * 75_000_000", memory_mb=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.ok and "longer than" in result.error
    assert peak < 1_000_000


@pytest.mark.parametrize(
    "code", ["answer = 'x' * 75_000_000", "import os\nos.write(2, b'e' * 75_000_000)\nanswer = 1"], ids=["stdout", "stderr"]
)
def test_server_reads_a_bounded_amount_of_output(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the runner's own length check (and, for stderr, the gate) 75 MB reach the pipe; the
    server stops reading at MAX_OUTPUT_BYTES and never holds the rest."""
    check = "if len(value) > max_chars:"
    assert check in sandbox._RUNNER
    monkeypatch.setattr(sandbox, "_RUNNER", _ungated_runner().replace(check, "if False:"))
    tracemalloc.start()
    try:
        result = run_program(code, memory_mb=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.ok and result.error.startswith("output too large")
    assert peak < 4 * sandbox.MAX_OUTPUT_BYTES + 500_000


def test_a_malformed_reply_is_a_failure_not_an_exception(ungated: Callable[..., ExecResult]) -> None:
    for line in ["[" * 20_000, "not json", '{"ok": true, "value": ' + "[" * 5000 + "]" * 5000 + "}"]:
        result = ungated(f"import os\nos.write(1, {line.encode()!r})\nos._exit(0)")
        assert not result.ok or len(result.value) <= sandbox.MAX_VALUE_CHARS


def _ungated_runner(runner: str = sandbox._RUNNER) -> str:
    """The runner without the AST gate and the builtins whitelist."""
    for old, new in [("problem = check(tree)", "problem = None"), ('scope = {"__builtins__": SAFE_BUILTINS}', "scope = {}")]:
        assert old in runner
        runner = runner.replace(old, new)
    return "import socket\n" + runner


@pytest.fixture
def ungated(monkeypatch: pytest.MonkeyPatch) -> Callable[..., ExecResult]:
    runner = sandbox._RUNNER

    def run(code: str) -> ExecResult:
        monkeypatch.setattr(sandbox, "_RUNNER", _ungated_runner(runner))
        return run_program(code)

    return run


def _run_ungated(code: str) -> str:
    """Run the sandbox's runner with the AST gate and builtins whitelist switched off, to show
    that the process layer (rlimits, empty env, no privileges) stops escapes on its own. ``socket``
    is imported before the limits, so that what stops a program using it is a layer, not a module
    it could not load."""
    runner = _ungated_runner()
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", runner, "2.0", "256", str(sandbox.MAX_VALUE_CHARS)],
        input=code.encode(),
        capture_output=True,
        env={},
        cwd=os.getcwd(),
        timeout=10,
    )
    return completed.stdout.decode() + completed.stderr.decode()


def test_process_layer_alone_blocks_files_and_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.chmod(tmp_path, 0o777)
    assert '"ok": false' in _run_ungated("f = open('pwned.txt', 'w')\nf.write('x')\nf.close()\nanswer = 1")
    assert not (tmp_path / "pwned.txt").exists() or (tmp_path / "pwned.txt").stat().st_size == 0
    assert '"ok": false' in _run_ungated("import os\nanswer = os.fork()")
    assert '"ok": false' in _run_ungated("import socket\nanswer = socket.socket()")
    assert '"ok": false' in _run_ungated("answer = open('/etc/hostname').read()")
    for code in [
        "import os\nos.close(0)\nanswer = open('/etc/hostname').read()",  # a freed fd number is still over the limit
        "import os\nos.close(0)\nos.close(2)\nanswer = os.pipe()",
        "import os\nanswer = os.dup(1)",
        "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\nanswer = 1",
    ]:
        assert '"ok": false' in _run_ungated(code), code
    assert '"ok": true' in _run_ungated("import os\nanswer = os.getpid()")  # the gate really is off
    out = _run_ungated("import os\nanswer = len(os.environ.get('HOME', ''))")
    assert '"value": "0"' in out or '"ok": false' in out
