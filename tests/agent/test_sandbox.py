"""The PAL sandbox, on real child processes: programs work, escapes fail, the parent is untouched,
and with the AST gate and the builtins whitelist switched off each lower layer still holds alone."""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

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
        ("answer = sorted([31, 7, 12])", "7, 12, 31"),  # a list reads as a person writes it
        ("answer = (2.0, 'b', 0.5)", "2, b, 0.5"),
        ("answer = [[1, 2], 3]", "[1, 2], 3"),
        ("total = 16 + 63", "79"),  # no ``answer``: the last top-level assignment's value
        ("ans = 16 + 63\nprint(ans)", "79"),
        ("n: int = 3\nn += 4", "7"),
        ("answer = 2\nextra = 9", "2"),  # ``answer`` wins wherever it is
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
    "missing_answer": "print(16 + 63)",  # nothing assigned: no answer to read
    "missing_answer_in_a_loop": "for i in range(3):\n    x = i",  # only a top-level assignment stands in
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


def test_one_long_c_call_is_stopped_too() -> None:
    """The runner's alarm handler only runs between bytecodes; the launcher's deadline and the CPU
    limit stop a program stuck in one C call (as PID 1 of a namespace it ignores a default SIGALRM)."""
    start = time.monotonic()
    result = run_program("answer = sum(range(10**13))", timeout_s=0.5)
    assert not result.ok and ("timeout" in result.error or "killed" in result.error)
    assert time.monotonic() - start < 0.5 + sandbox.STARTUP_GRACE_S + 1.5


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
    "code",
    ["answer = 'x' * 75_000_000", "import os\nos.write(2, b'e' * 75_000_000)\nanswer = 1"],
    ids=["stdout", "stderr"],
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


def test_sandbox_report_names_the_layers() -> None:
    layers = sandbox.sandbox_report()
    assert layers is sandbox.sandbox_report()  # probed once
    assert layers.no_new_fds
    if os.geteuid() == 0:
        assert layers.child_uid == 65534 and not layers.server_undumpable
    else:
        assert layers.child_uid == os.geteuid() and layers.server_undumpable
    assert str(layers).startswith("programs run as")


# --- each lower layer alone: the AST gate and the builtins whitelist switched off ------------------------

GATE, WHITELIST = "problem = check(tree)", 'scope = {"__builtins__": SAFE_BUILTINS}'
FD_LIMIT = "limit(resource.RLIMIT_NOFILE, 0)"
UNSHARE = "if libc.unshare(flags) == 0"


def _ungated_runner(*, fd_limit: bool = True, runner: str = sandbox._RUNNER) -> str:
    """The runner without the AST gate and the builtins whitelist (and, if asked, without the fd limit).
    ``socket`` is imported before the limits, so that what stops a program using it is a layer, not
    a module it could not load."""
    for old, new in [(GATE, "problem = None"), (WHITELIST, "scope = {}")] + ([] if fd_limit else [(FD_LIMIT, "pass")]):
        assert old in runner
        runner = runner.replace(old, new)
    return "import socket\n" + runner


def _without_namespaces(launcher: str) -> str:
    assert UNSHARE in launcher
    return launcher.replace(UNSHARE, "if False")


@pytest.fixture
def ungated(monkeypatch: pytest.MonkeyPatch) -> Callable[..., ExecResult]:
    runner, launcher = sandbox._RUNNER, sandbox._LAUNCHER

    def run(code: str, *, fd_limit: bool = True, namespaces: bool = True) -> ExecResult:
        monkeypatch.setattr(sandbox, "_RUNNER", _ungated_runner(fd_limit=fd_limit, runner=runner))
        monkeypatch.setattr(sandbox, "_LAUNCHER", launcher if namespaces else _without_namespaces(launcher))
        return run_program(code)

    return run


def test_ungated_runner_really_runs_anything(ungated: Callable[..., ExecResult]) -> None:
    # an import ran, and the environment is empty (but for the locale Python itself sets, PEP 538)
    assert ungated("import os\nanswer = sorted(os.environ)").value in ("", "LC_CTYPE")
    assert ungated("answer = __import__('sys').version_info[0]").value == "3"


def test_fd_layer_alone_blocks_files_sockets_and_processes(tmp_path: Path, ungated: Callable[..., ExecResult]) -> None:
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "pwned.txt"
    run = functools.partial(ungated, namespaces=False)
    assert not run(f"f = open({str(target)!r}, 'w')\nf.write('x')\nf.close()\nanswer = 1").ok
    assert not target.exists()
    for code in [
        "import os\nanswer = os.fork()",
        "import socket\nanswer = socket.socket()",
        "answer = open('/etc/hostname').read()",
        "import os\nos.close(0)\nanswer = open('/etc/hostname').read()",  # a freed fd number is still over the limit
        "import os\nos.close(0)\nos.close(2)\nanswer = os.pipe()",
        "import os\nanswer = os.dup(1)",
        "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\nanswer = 1",
    ]:
        result = run(code)
        assert not result.ok, (code, result)


def test_namespaces_alone_keep_the_network_and_other_processes_out_of_reach(ungated: Callable[..., ExecResult]) -> None:
    layers = sandbox.sandbox_report()
    if not (layers.network_namespace and layers.pid_namespace):
        pytest.skip(f"this host does not let the sandbox create network and PID namespaces ({layers})")
    run = functools.partial(ungated, fd_limit=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert run("import socket\nanswer = socket.socket().fileno() > 0").value == "True"  # sockets exist here...
        result = run(f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))\nanswer = 1")
        assert not result.ok and "OSError" in result.error  # ...but no network: "Network is unreachable"
    assert run("import os\nanswer = os.getpid()").value == "1"
    result = run(f"import os\nos.kill({os.getpid()}, 0)\nanswer = 1")
    assert not result.ok and result.error.startswith("ProcessLookupError")  # not there at all, not merely forbidden


# --- a server running as a normal user ---------------------------------------------------------------

NOBODY_SERVER = r"""
import ctypes, importlib.util, json, os, socket, subprocess, sys

spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
variants = json.loads(sys.stdin.read())
me = os.getpid()

def outsider_reads_environ():  # another process of the same user, not sandboxed
    code = "print(b'S2AGENT_ADMIN_TOKEN' in open('/proc/%d/environ', 'rb').read())" % me
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, env={})
    return run.stdout.strip() == "True"

dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
facts = {"uid": os.getuid(), "dumpable": dumpable, "outsider_before": outsider_reads_environ()}
layers = sandbox.sandbox_report()
facts.update(layers=vars(layers), outsider_after=outsider_reads_environ())
with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    programs = {
        "environ": "answer = open('/proc/%d/environ', 'rb').read()" % me,
        "signal": "import os\nos.kill(%d, 0)\nanswer = 'signalled'" % me,
        "connect": "import socket\nsocket.socket().connect(('127.0.0.1', %d))\nanswer = 'connected'" % port,
    }
    for name, (runner, launcher) in variants.items():
        sandbox._RUNNER, sandbox._LAUNCHER = runner, launcher
        facts[name] = {what: vars(sandbox.run_program(code)) for what, code in programs.items()}
print(json.dumps(facts))
"""


def _hidden_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that other users may not enter, if any."""
    parts = Path(path).parents
    return next((str(d) for d in reversed(parts) if not os.stat(d).st_mode & 0o001), None)


def _run_as_nobody(script: str, stdin: str, tmp_path: Path) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        pytest.skip("starting a server as an unprivileged user needs root")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "S2AGENT_ADMIN_TOKEN": "not-for-programs"}
    command = [sys.executable, "-I", "-S", "-c", script, str(Path(sandbox.__file__).resolve())]
    interpreter = os.path.realpath(sys.executable)
    hidden = _hidden_ancestor(interpreter)
    if hidden is None:
        return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=120,
                              user=65534, group=65534, extra_groups=[], check=False)
    # The interpreter lives under a directory only root may enter (pyenv in /root): show nobody just
    # the interpreter's tree there, in a private mount namespace: a tmpfs over that directory, with
    # the one entry leading to the interpreter bound back in.
    entry = Path(interpreter).relative_to(hidden).parts[0]
    tools = shutil.which("unshare") and shutil.which("setpriv")
    if _hidden_ancestor(str(Path(hidden) / entry / "x")) != hidden or not tools:
        pytest.skip(f"cannot show the interpreter under {hidden} to an unprivileged user")
    keep = tmp_path / "hidden"
    keep.mkdir()
    expose = (
        'set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=755 tmpfs "$1"; mkdir "$1/$3"; '
        'mount --bind "$2/$3" "$1/$3"; shift 3; exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"'
    )
    completed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", expose, "sh", hidden, str(keep), entry]
        + command,
        input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    if completed.returncode and "mount" in completed.stderr:
        pytest.skip(f"cannot make a private mount namespace here: {completed.stderr.strip()[-200:]}")
    return completed


def test_as_a_normal_user_programs_cannot_reach_the_server(tmp_path: Path) -> None:
    """The server runs as nobody; programs run with the gate and the whitelist off, and then with the
    fd limit off as well (or the namespaces): they must not read its environment (the admin token),
    signal it, or connect to its port on 127.0.0.1."""
    variants = {
        "gate_off": (_ungated_runner(), sandbox._LAUNCHER),
        "gate_and_fds_off": (_ungated_runner(fd_limit=False), sandbox._LAUNCHER),
        "gate_and_namespaces_off": (_ungated_runner(), _without_namespaces(sandbox._LAUNCHER)),
        "control": (_ungated_runner(fd_limit=False), _without_namespaces(sandbox._LAUNCHER)),
    }
    completed = _run_as_nobody(NOBODY_SERVER, json.dumps(variants), tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    facts = json.loads(completed.stdout)
    assert facts["uid"] == 65534 and facts["dumpable"] == 1
    assert facts["outsider_before"]  # the threat is real: the same user could read the token...
    assert not facts["outsider_after"]  # ...until the sandbox made the server undumpable
    layers = facts["layers"]
    assert layers["no_new_fds"] and layers["server_undumpable"] and layers["child_uid"] == 65534

    def blocked(variant: str, what: str) -> None:
        result = facts[variant][what]
        assert not result["ok"] and result["value"] is None, (variant, what, result)

    for what in ("environ", "signal", "connect"):
        blocked("gate_off", what)
    for what in ("environ", "connect"):  # without namespaces a same-user child could signal the server
        blocked("gate_and_namespaces_off", what)
    blocked("gate_and_fds_off", "environ")  # the server is undumpable
    assert facts["gate_and_fds_off"]["environ"]["error"].startswith("PermissionError")
    # with those layers off too, the same programs do reach the server: the checks above are not vacuous
    assert facts["control"]["connect"]["value"] == "connected" and facts["control"]["signal"]["value"] == "signalled"
    if not (layers["user_namespace"] and layers["network_namespace"] and layers["pid_namespace"]):
        pytest.skip(f"no unprivileged user namespaces here; with the fd limit off nothing else holds ({layers})")
    blocked("gate_and_fds_off", "signal")
    blocked("gate_and_fds_off", "connect")
    assert facts["gate_and_fds_off"]["signal"]["error"].startswith("ProcessLookupError")
    assert "unreachable" in facts["gate_and_fds_off"]["connect"]["error"]
