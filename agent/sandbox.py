"""Running model-written programs for program-aided System 2 (PAL), safely.

Why this is safe: defence in depth, five independent layers, each of which alone stops the
common escapes, so that a hole in one is not a hole in the sandbox.

1. **Process isolation.** Every program runs in its own fresh interpreter (``python -I -S``:
   no user site, no site-packages, no ``PYTHON*`` variables), never in the server's process. A
   crash, a hang or a corrupted interpreter dies with the child; the parent reads at most
   :data:`MAX_OUTPUT_BYTES` from it (more is an "output too large" failure, never buffered) and
   only uses one JSON line of it. A wall-clock timeout kills the child's whole process group.
2. **Resource limits** (``setrlimit``), applied by the child before it reads the program: address
   space (``memory_mb``), CPU seconds, no file writes (``RLIMIT_FSIZE`` 0), no new processes
   (``RLIMIT_NPROC`` 0), and no new file descriptors at all (``RLIMIT_NOFILE`` 0, soft and hard).
   That limit is on the fd *number*: a new fd must be below it, so with 0 no file, socket, pipe or
   directory can be opened, even after closing stdin, stdout or stderr (with a limit of 3, closing
   fd 0 made room for one). The runner imports everything it needs before, and keeps only the pipes
   it was started with. When started as root the child first drops to user ``nobody``, because
   root could raise its limits again and ignores ``RLIMIT_NPROC``; if it cannot drop, it refuses
   to run the program. A limit that cannot be set stops the child too.
3. **Empty environment, empty directory.** No environment variables (no tokens or keys to read),
   and the working directory is a new empty temporary directory, removed afterwards.
4. **AST gate.** Before running, the program is parsed and rejected if it contains an import,
   any name (other than a bare ``_``) or attribute starting with ``_`` (this blocks the
   ``__class__.__subclasses__()``, ``__globals__`` and ``__builtins__`` tricks), frame and code attributes (``gi_frame``,
   ``f_back``, ``f_globals``, ...: a generator's frame leads back to the runner's globals),
   ``str.format`` (its format strings can walk attributes), class definitions, or the names
   ``eval``, ``exec``, ``compile``, ``open``, ``getattr``, ``globals``, ``vars``, ``input``,
   ``breakpoint`` and the like.
5. **Builtins whitelist.** The program runs with a builtins dict holding only pure functions and
   types (``len``, ``range``, ``sorted``, ``sum``, ...) and a ``print`` that does nothing; there is
   no ``__import__``, so even code that slipped past the gate cannot import.

The limits are applied inside the child, as its first statements, rather than in a
``preexec_fn``: ``preexec_fn`` is not safe in a process with threads (the server has several, and
:func:`run_programs` uses a thread pool), and the untrusted code is only read from stdin after the
limits are in place, so nothing it does runs unlimited.

Linux only: ``RLIMIT_AS`` is not enforced on macOS, and Windows has no ``resource`` module.

The program must assign a variable ``answer``; its value comes back as ``str(answer)``, with
integral floats written as integers ("85", not "85.0") so that they vote like System 1's answers.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

MAX_VALUE_CHARS = 2000
"""An ``answer`` whose text is longer than this is not an answer (and would bloat the store)."""

MAX_OUTPUT_BYTES = 12 * MAX_VALUE_CHARS + 4096
"""The most the server reads from a child's stdout or stderr: a JSON reply holding a value of
:data:`MAX_VALUE_CHARS` characters fits (``json.dumps`` writes a non-ASCII character in at most 12
bytes); anything longer is rejected as "output too large" without being buffered."""

STARTUP_GRACE_S = 1.0
"""Wall-clock allowance for the child interpreter to start, on top of the program's ``timeout_s``."""


@dataclass
class ExecResult:
    ok: bool
    value: str | None
    """``str(answer)`` when ``ok``."""
    error: str | None
    """A short reason when not ``ok`` ("timeout after 2s", "import statements are not allowed", ...)."""


# The runner is the whole child program. It is a string (passed with -c) so that the child imports
# nothing from this package: it needs only the standard library, which -I -S still provides.
_RUNNER = r'''
import ast, builtins, json, os, resource, signal, sys

timeout_s, memory_mb, max_chars = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def reply(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()
    os._exit(0)

def limit(which, value):  # fails loudly: a limit that cannot be set is not a limit
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))

if os.getuid() == 0:  # root could raise its limits again, and ignores RLIMIT_NPROC
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    except OSError as error:
        reply(ok=False, error="sandbox could not drop root privileges: %s" % error)
limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
limit(resource.RLIMIT_CPU, int(timeout_s) + 1)
limit(resource.RLIMIT_FSIZE, 0)
limit(resource.RLIMIT_NPROC, 0)
limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_NOFILE, 0)  # no new fd of any number: no files, sockets or pipes, even after a close
source = sys.stdin.buffer.read().decode("utf-8", "replace")  # only now: limits are in place
sys.stdin.close()

BANNED_NAMES = {
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "hasattr", "globals",
    "locals", "vars", "dir", "input", "breakpoint", "help", "exit", "quit", "memoryview",
    "type", "object", "super", "classmethod", "staticmethod", "property",
}
BANNED_ATTRS = {"mro", "format", "format_map"}
BANNED_ATTR_PREFIXES = ("_", "gi_", "cr_", "ag_", "f_", "tb_", "co_", "func_")
BANNED_NODES = (
    ast.Import, ast.ImportFrom, ast.ClassDef, ast.Global, ast.Nonlocal,
    ast.AsyncFunctionDef, ast.AsyncFor, ast.AsyncWith, ast.Await,
)

def check(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return "import statements are not allowed"
        if isinstance(node, BANNED_NODES):
            return type(node).__name__ + " is not allowed"
        names = []
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ExceptHandler)) and node.name:
            names.append(node.name)
        elif isinstance(node, ast.arg):
            names.append(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.append(node.arg)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.append(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.append(node.rest)
        elif isinstance(node, ast.MatchClass):
            return "match class patterns are not allowed"
        for name in names:
            if name.startswith("_") and name != "_":  # a bare "_" is the usual throwaway variable
                return "name %r is not allowed" % name
            if name in BANNED_NAMES:
                return "name %r is not allowed" % name
        if isinstance(node, ast.Attribute):
            if node.attr in BANNED_ATTRS or node.attr.startswith(BANNED_ATTR_PREFIXES):
                return "attribute %r is not allowed" % node.attr
    return None

SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "len", "range", "str", "int", "float", "abs", "min", "max", "sum", "sorted", "reversed",
        "enumerate", "zip", "list", "dict", "set", "tuple", "bool", "round", "map", "filter",
        "any", "all", "isinstance", "ord", "chr", "divmod", "pow",
        "Exception", "ValueError", "TypeError", "KeyError", "IndexError", "ZeroDivisionError",
    )
}
SAFE_BUILTINS["print"] = lambda *args, **kwargs: None

try:
    tree = ast.parse(source, "<program>", "exec")
except SyntaxError as error:
    reply(ok=False, error="SyntaxError: %s (line %s)" % (error.msg, error.lineno))
problem = check(tree)
if problem:
    reply(ok=False, error=problem)
code = compile(tree, "<program>", "exec")
scope = {"__builtins__": SAFE_BUILTINS}
del source, tree
signal.setitimer(signal.ITIMER_REAL, timeout_s)  # default action of SIGALRM: terminate
try:
    exec(code, scope)
    if "answer" not in scope:
        reply(ok=False, error="the program did not set a variable 'answer'")
    answer = scope["answer"]
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    value = str(answer)
    signal.setitimer(signal.ITIMER_REAL, 0)
except MemoryError:
    reply(ok=False, error="MemoryError: over the memory limit")
except RecursionError:
    reply(ok=False, error="RecursionError: maximum recursion depth exceeded")
except BaseException as error:
    reply(ok=False, error=("%s: %s" % (type(error).__name__, error))[:200])
if len(value) > max_chars:
    reply(ok=False, error="answer is longer than %d characters" % max_chars)
reply(ok=True, value=value)
'''


def _describe_exit(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        reason = {
            "SIGXCPU": "over the CPU time limit",
            "SIGALRM": "timeout",
            "SIGKILL": "killed",
            "SIGSEGV": "crashed",
        }.get(name, "killed")
        return f"{reason} ({name})"
    last = stderr.strip().splitlines()[-1:] or [f"exit status {returncode}"]
    return last[0][:200]


def run_program(code: str, *, timeout_s: float = 2.0, memory_mb: int = 256) -> ExecResult:
    """Run one program in a fresh, limited child process and return its ``answer``.

    Never raises for anything the program does: errors, timeouts, memory exhaustion, output over
    :data:`MAX_OUTPUT_BYTES` and a missing ``answer`` all come back as ``ok=False`` with a short reason.
    """
    reply, error = _run_child(code, timeout_s=timeout_s, memory_mb=memory_mb)
    if reply is None:
        return ExecResult(ok=False, value=None, error=error)
    if not reply.get("ok"):
        return ExecResult(ok=False, value=None, error=str(reply.get("error") or "failed"))
    value = str(reply.get("value"))
    if len(value) > MAX_VALUE_CHARS:
        return ExecResult(ok=False, value=None, error=f"answer is longer than {MAX_VALUE_CHARS} characters")
    return ExecResult(ok=True, value=value, error=None)


def _run_child(code: str, *, timeout_s: float, memory_mb: int) -> tuple[dict | None, str]:
    """Start the runner, hand it ``code``, and return its JSON reply, or None and why not."""
    command = [
        sys.executable, "-I", "-S", "-B", "-c", _RUNNER, repr(float(timeout_s)), str(int(memory_mb)), str(MAX_VALUE_CHARS),
    ]
    deadline = time.monotonic() + timeout_s + STARTUP_GRACE_S
    with tempfile.TemporaryDirectory(prefix="s2agent-sandbox-") as workdir:
        os.chmod(workdir, 0o777)  # the child may run as "nobody"; it still cannot write (no fds)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env={},
                start_new_session=True,  # its own process group, so a timeout kills all of it
                close_fds=True,
            )
        except OSError as error:
            logger.error("could not start the sandbox interpreter: %s", error)
            return None, f"could not start sandbox: {error}"
        try:
            stdout, stderr, problem = _exchange(process, code.encode("utf-8"), deadline)
            if problem is None:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            problem = "timeout"
        finally:
            if process.poll() is None:  # deadline, too much output, or e.g. KeyboardInterrupt
                _kill_group(process)
                process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                pipe.close()
    if problem == "timeout":
        return None, f"timeout after {timeout_s:g}s"
    if problem is not None:
        return None, problem
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except (ValueError, RecursionError):  # the line is the child's: it may be anything, deeply nested too
        reply = None
    if isinstance(reply, dict):
        return reply, ""
    error = _describe_exit(process.returncode, stderr.decode("utf-8", "replace"))
    return None, f"timeout after {timeout_s:g}s" if error.startswith("timeout") else error


_PIPE_CHUNK = 4096
"""Bytes written to the child's stdin per ready event (``PIPE_BUF``: a ready pipe takes them without blocking)."""


def _exchange(process: subprocess.Popen, data: bytes, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Write ``data`` to the child's stdin and read its stdout and stderr to the end, like
    ``communicate`` but reading at most :data:`MAX_OUTPUT_BYTES` from each: a child cannot make the
    server buffer what it writes. Returns (stdout, stderr, problem), problem being None, "timeout"
    or "output too large ..."."""
    output = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    stdin = process.stdin.fileno()
    offset = 0
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_WRITE)
        for fd in output:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"", b"", "timeout"
            for key, _ in selector.select(remaining):
                if key.fd == stdin:
                    try:
                        offset += os.write(stdin, data[offset : offset + _PIPE_CHUNK])
                    except BrokenPipeError:  # the child stopped reading (e.g. it refused to start)
                        offset = len(data)
                    if offset >= len(data):
                        selector.unregister(stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                output[key.fd] += chunk
                if len(output[key.fd]) > MAX_OUTPUT_BYTES:
                    return b"", b"", f"output too large (over {MAX_OUTPUT_BYTES} bytes)"
    return bytes(output[process.stdout.fileno()]), bytes(output[process.stderr.fileno()]), None


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def run_programs(
    codes: Sequence[str], *, timeout_s: float = 2.0, memory_mb: int = 256, max_workers: int = 2
) -> list[ExecResult]:
    """Run several programs (e.g. the k PAL samples of one query) in parallel child processes.

    Threads only wait on the children, so ``max_workers`` bounds the number of concurrent
    interpreters (CPU and memory), not Python work. Results are in the order of ``codes``.
    """
    if not codes:
        return []
    workers = max(1, min(max_workers, len(codes)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda c: run_program(c, timeout_s=timeout_s, memory_mb=memory_mb), codes))
