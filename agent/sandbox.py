"""Running model-written programs for program-aided System 2 (PAL), safely.

Why this is safe: defence in depth. Each layer below stops the common escapes on its own, so that a
hole in one is not a hole in the sandbox; ``tests/agent/test_sandbox.py`` switches the upper layers
off and shows each lower one holding alone.

1. **Process isolation.** Every program runs in its own fresh interpreter (``python -I -S``:
   no user site, no site-packages, no ``PYTHON*`` variables), never in the server's process. A
   crash, a hang or a corrupted interpreter dies with the child; the parent reads at most
   :data:`MAX_OUTPUT_BYTES` from it (more is an "output too large" failure, never buffered) and
   kills its whole process group at the deadline.
2. **No new file descriptors** (``RLIMIT_NOFILE`` 0, soft and hard). The limit is on the fd
   *number*: a new fd must be below it, so with 0 no file, socket, pipe or directory can be opened
   at all, even after closing stdin, stdout or stderr. The runner imports everything it needs
   before, and keeps only the pipes it was started with. This alone blocks reading files
   (``/proc/<server>/environ`` included), the network and writing anything.
3. **Other resource limits** (``setrlimit``): address space (``memory_mb``), CPU seconds, no file
   writes (``RLIMIT_FSIZE`` 0), no new processes (``RLIMIT_NPROC`` 0), no core files. Started as
   root, the child first drops to user ``nobody`` (root can raise its limits and ignores
   ``RLIMIT_NPROC``); if it cannot drop, it refuses to run the program.
4. **Namespaces, where the host allows them.** A small launcher process puts the child in new
   network, PID and IPC namespaces (plus a user namespace when the server is not root): no
   network interface but a loopback that is down (so not even the server's own port on
   127.0.0.1), no view of any other process (it is PID 1 of its own namespace, so it can neither
   signal nor trace the server or other sandboxes), no shared SysV memory. It also sets
   ``no_new_privs``, so nothing the child executes can gain privileges. The launcher imports
   ``ctypes`` for this; the runner is a fresh interpreter it executes, so the program never has it.
5. **The server cannot be read by a same-user child.** As root, the child is ``nobody`` and cannot
   read or signal the server. As a normal user, :func:`run_program` marks the server process
   undumpable (``prctl(PR_SET_DUMPABLE, 0)``, what ``ssh-agent`` does): its ``/proc`` entries
   (``environ``, ``mem``, ...) become root's and it cannot be traced or have its memory read by
   processes of the same user. Cost: the server writes no core dump, and debuggers or profilers
   (``gdb``, ``py-spy``) must run as root to attach to it.
6. **Empty environment, empty directory.** No environment variables (no tokens or keys to read),
   and the working directory is a new empty temporary directory, removed afterwards.
7. **AST gate.** Before running, the program is parsed and rejected if it contains an import,
   any name (other than a bare ``_``) or attribute starting with ``_`` (this blocks the
   ``__class__.__subclasses__()``, ``__globals__`` and ``__builtins__`` tricks), frame and code attributes (``gi_frame``,
   ``f_back``, ``f_globals``, ...: a generator's frame leads back to the runner's globals),
   ``str.format`` (its format strings can walk attributes), class definitions, or the names
   ``eval``, ``exec``, ``compile``, ``open``, ``getattr``, ``globals``, ``vars``, ``input``,
   ``breakpoint`` and the like.
8. **Builtins whitelist.** The program runs with a builtins dict holding only pure functions and
   types (``len``, ``range``, ``sorted``, ``sum``, ...) and a ``print`` that does nothing; there is
   no ``__import__``, so even code that slipped past the gate cannot import.

What holds where (:func:`sandbox_report` finds out on the running host and logs it; it is meant
to be called once at start): layers 1-3, 6-8 everywhere on Linux. Layer 4 where the kernel lets this user
create namespaces (root with ``CAP_SYS_ADMIN``; a normal user where unprivileged user namespaces
are allowed; often not inside a container under a default seccomp profile). Without it, a child
running as the server's own user (non-root server) could signal the server if the layers above
failed, and only the fd limit keeps it off the network. Layer 5 applies to non-root servers only.
A non-root server's own files (its store, its config) are kept from a program by the fd limit, the
gate and the whitelist, not by file permissions; running the server as root (the child is then
``nobody``) or as a dedicated user with nothing else to read adds that layer.

The limits are applied inside the child, as its first statements, rather than in a
``preexec_fn``: ``preexec_fn`` is not safe in a process with threads (the server has several, and
:func:`run_programs` uses a thread pool), and the untrusted code is only read from stdin after the
limits are in place, so nothing it does runs unlimited.

Timeouts: the runner stops the program ``timeout_s`` after starting it (an alarm handler, since
PID 1 of a namespace ignores a default-action ``SIGALRM``); the launcher kills it
:data:`STARTUP_GRACE_S` later if it is still running (e.g. stuck in one long C call); the server
kills the process group half a second after that as a last resort.

Linux only: ``RLIMIT_AS`` is not enforced on macOS, and Windows has no ``resource`` module.

The program assigns a variable ``answer`` (else the name its last top-level assignment binds: "total =
16 + 63" answers 79); its value comes back as ``str(answer)``, with
integral floats written as integers ("85", not "85.0") so that they vote like System 1's answers, and
a list or tuple as its items joined by ", " ("3, 7, 12", what a person writes, not Python's brackets).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MAX_VALUE_CHARS = 2000
"""An ``answer`` whose text is longer than this is not an answer (and would bloat the store)."""

MAX_OUTPUT_BYTES = 12 * MAX_VALUE_CHARS + 4096
"""The most the server reads from a child's stdout or stderr: a JSON reply holding a value of
:data:`MAX_VALUE_CHARS` characters fits (``json.dumps`` writes a non-ASCII character in at most 12
bytes); anything longer is rejected as "output too large" without being buffered."""

STARTUP_GRACE_S = 1.0
"""Wall-clock allowance for the child interpreter to start, on top of the program's ``timeout_s``."""

_LAST_RESORT_S = 0.5
"""How long after the launcher's own deadline the server kills the process group itself."""


@dataclass
class ExecResult:
    ok: bool
    value: str | None
    """``str(answer)`` when ``ok``."""
    error: str | None
    """A short reason when not ``ok`` ("timeout after 2s", "import statements are not allowed", ...)."""


@dataclass(frozen=True)
class SandboxLayers:
    """Which layers below the AST gate and the builtins whitelist hold on this host (see the module
    docstring); :func:`sandbox_report` fills it in by starting one probe child."""

    child_uid: int
    """The user the program runs as: 65534 (``nobody``) for a root server, else the server's own."""
    server_is_root: bool
    no_new_fds: bool
    """``RLIMIT_NOFILE`` is 0: no file, socket or pipe can be opened, whatever is closed first."""
    network_namespace: bool
    pid_namespace: bool
    user_namespace: bool
    """Needed, as a normal user, for the network and PID namespaces; root does without."""
    server_undumpable: bool
    """A same-user child cannot read the server's ``/proc`` entries or memory (non-root only)."""

    _LAYERS = ("no_new_fds", "network_namespace", "pid_namespace", "user_namespace", "server_undumpable")

    def missing(self) -> list[str]:
        """The layers that do not hold here and would for this kind of server on a fuller host."""
        wanted = ["no_new_fds", "network_namespace", "pid_namespace"]
        if not self.server_is_root:
            wanted += ["user_namespace", "server_undumpable"]
        return [name for name in wanted if not getattr(self, name)]

    def __str__(self) -> str:
        user = "nobody" if self.child_uid == 65534 else f"uid {self.child_uid}"
        held = [name for name in self._LAYERS if getattr(self, name)]
        missing = self.missing()
        return (
            f"programs run as {user}; layers below the AST gate and builtins whitelist: "
            f"{', '.join(held) or 'none'}; missing here: {', '.join(missing) or 'none'}"
        )


# The launcher is the first child. It makes the namespaces (with ctypes, which Python 3.11's os
# lacks), forks, and the child executes the runner in a fresh interpreter, so the program never
# finds ctypes already imported. It then waits, kills the runner at its deadline, and exits the way
# the runner did (same status or same signal), so the server reads one child as before.
_LAUNCHER = r"""
import ctypes, os, resource, sys
import _signal as signal  # the C module: signal.py would import enum, a few ms per program

deadline_s, runner, args = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # re-raising the runner's SIGSEGV writes no core
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: nothing executed below can gain privileges
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
uid, gid = os.getuid(), os.getgid()
flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | (0 if uid == 0 else CLONE_NEWUSER)
if libc.unshare(flags) == 0 and uid != 0:
    # keep our own ids inside the user namespace (not root there: the runner has no capabilities)
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)), ("gid_map", "%d %d 1" % (gid, gid))):
        try:
            with open("/proc/self/" + name, "w") as file:
                file.write(text)
        except OSError:
            pass
# otherwise no namespaces on this host; the other layers still hold (sandbox_report says which)

child = os.fork()  # PID 1 of the new PID namespace
if child == 0:
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "-c", runner] + args)
    finally:
        os._exit(127)

expired = []
def expire(signum, frame):
    expired.append(True)
    os.kill(child, signal.SIGKILL)  # not reaped yet (WNOWAIT below), so the pid is still the runner's
signal.signal(signal.SIGALRM, expire)
signal.setitimer(signal.ITIMER_REAL, deadline_s)
os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
signal.setitimer(signal.ITIMER_REAL, 0)
_, status = os.waitpid(child, 0)
code = -signal.SIGALRM if expired else os.waitstatus_to_exitcode(status)
if code >= 0:
    os._exit(code)
if -code != signal.SIGKILL:
    signal.signal(-code, signal.SIG_DFL)
os.kill(os.getpid(), -code)
os._exit(128 - code)
"""

# The runner is the program's own process. It is a string (passed with -c) so that the child
# imports nothing from this package: it needs only the standard library, which -I -S still provides.
_RUNNER = r"""
# C modules only where the Python ones import much more (ast: enum, contextlib; json: re; signal:
# enum): they would double this interpreter's start-up time, paid by every program.
import _ast as ast, _json, builtins, os, resource, sys
import _signal as signal

timeout_s, memory_mb, max_chars = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
probe = sys.argv[4:] == ["probe"]
if probe:
    import json

def reply(ok, value=None, error=None):
    signal.setitimer(signal.ITIMER_REAL, 0)
    key, text = ("value", value) if ok else ("error", error)
    sys.stdout.write('{"ok": %s, "%s": %s}\n' % ("true" if ok else "false", key, _json.encode_basestring_ascii(text)))
    sys.stdout.flush()
    os._exit(0)

def parse(source):  # ast.parse
    return compile(source, "<program>", "exec", ast.PyCF_ONLY_AST)

def walk(tree):  # ast.walk: every node, breadth first
    todo = [tree]
    for node in todo:
        yield node
        for name in node._fields:
            field = getattr(node, name, None)
            if isinstance(field, ast.AST):
                todo.append(field)
            elif isinstance(field, list):
                todo.extend(item for item in field if isinstance(item, ast.AST))

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
if probe:
    namespaces = {kind: os.readlink("/proc/self/ns/" + kind) for kind in ("net", "pid", "user", "ipc")}
    reply(ok=True, value=json.dumps({"uid": os.getuid(), "pid": os.getpid(), "ns": namespaces,
                                     "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}))
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
    for node in walk(tree):
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
    tree = parse(source)
except SyntaxError as error:
    reply(ok=False, error="SyntaxError: %s (line %s)" % (error.msg, error.lineno))
problem = check(tree)
if problem:
    reply(ok=False, error=problem)
# Without an ``answer``, the value the last top-level assignment stored is the answer: a small model often
# names its result otherwise ("total = 16 + 63"), and that program still answers.
fallback = None
for statement in tree.body:
    targets = statement.targets if isinstance(statement, ast.Assign) else (
        [statement.target] if isinstance(statement, (ast.AnnAssign, ast.AugAssign)) else [])
    if len(targets) == 1 and isinstance(targets[0], ast.Name):
        fallback = targets[0].id
code = compile(tree, "<program>", "exec")
scope = {"__builtins__": SAFE_BUILTINS}
del source, tree
# A handler, not the default action: as PID 1 of a namespace the runner ignores a default SIGALRM.
signal.signal(signal.SIGALRM, lambda signum, frame: reply(ok=False, error="timeout after %gs" % timeout_s))
signal.setitimer(signal.ITIMER_REAL, timeout_s)
try:
    exec(code, scope)
    name = "answer" if "answer" in scope else fallback
    if name not in scope:
        reply(ok=False, error="the program did not set a variable 'answer'")
    answer = scope[name]
    shown = lambda x: str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)  # noqa: E731
    value = ", ".join(map(shown, answer)) if isinstance(answer, (list, tuple)) else shown(answer)
except MemoryError:
    reply(ok=False, error="MemoryError: over the memory limit")
except RecursionError:
    reply(ok=False, error="RecursionError: maximum recursion depth exceeded")
except BaseException as error:
    reply(ok=False, error=("%s: %s" % (type(error).__name__, error))[:200])
if len(value) > max_chars:
    reply(ok=False, error="answer is longer than %d characters" % max_chars)
reply(ok=True, value=value)
"""


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
    _protect_server()
    reply, error = _run_child(code, timeout_s=timeout_s, memory_mb=memory_mb)
    if reply is None:
        return ExecResult(ok=False, value=None, error=error)
    if not reply.get("ok"):
        return ExecResult(ok=False, value=None, error=str(reply.get("error") or "failed"))
    value = str(reply.get("value"))
    if len(value) > MAX_VALUE_CHARS:
        return ExecResult(ok=False, value=None, error=f"answer is longer than {MAX_VALUE_CHARS} characters")
    return ExecResult(ok=True, value=value, error=None)


def _run_child(code: str, *, timeout_s: float, memory_mb: int, mode: str = "run") -> tuple[dict | None, str]:
    """Start the launcher, hand it ``code``, and return the runner's JSON reply, or None and why not."""
    command = [
        sys.executable, "-I", "-S", "-B", "-c", _LAUNCHER, repr(float(timeout_s) + STARTUP_GRACE_S),
        _RUNNER, repr(float(timeout_s)), str(int(memory_mb)), str(MAX_VALUE_CHARS), mode,
    ]
    deadline = time.monotonic() + timeout_s + STARTUP_GRACE_S + _LAST_RESORT_S
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


def _protect_server() -> bool:
    """As a normal user, make this (the server's) process undumpable, so that a child running as the
    same user cannot read its ``/proc`` entries (``environ`` holds the admin token) or its memory,
    nor trace it. As root there is nothing to do: the child runs as ``nobody``. Idempotent; returns
    whether the server is protected this way."""
    if os.geteuid() == 0 or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    return libc.prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE


_report: SandboxLayers | None = None
_report_lock = threading.Lock()


def sandbox_report() -> SandboxLayers:
    """Which layers below the AST gate and the builtins whitelist hold on this host, found once by
    starting one probe child through the same launcher and runner as every program, and logged
    (a warning when some are missing). Meant to be called once at start; later calls return the
    same answer. Also makes a non-root server undumpable, as the first program would."""
    global _report
    with _report_lock:
        if _report is not None:
            return _report
    undumpable = _protect_server()
    reply, error = _run_child("", timeout_s=2.0, memory_mb=256, mode="probe")
    server_is_root = os.geteuid() == 0
    try:
        facts = json.loads(reply["value"]) if reply and reply.get("ok") else None
    except (TypeError, ValueError, RecursionError):
        facts = None
    if facts is None:
        logger.error("the sandbox probe failed (%s); PAL programs will fail the same way", error or reply)
        report = SandboxLayers(
            child_uid=-1, server_is_root=server_is_root, no_new_fds=False, network_namespace=False,
            pid_namespace=False, user_namespace=False, server_undumpable=undumpable,
        )
    else:
        ours = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in facts["ns"]}
        moved = {kind: facts["ns"][kind] != ours[kind] for kind in ours}
        report = SandboxLayers(
            child_uid=facts["uid"],
            server_is_root=server_is_root,
            no_new_fds=list(facts["nofile"]) == [0, 0],
            network_namespace=moved["net"],
            pid_namespace=moved["pid"] and facts["pid"] == 1,
            user_namespace=moved["user"],
            server_undumpable=undumpable,
        )
        (logger.warning if report.missing() else logger.info)("sandbox: %s", report)
    with _report_lock:
        _report = report
    return report


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
