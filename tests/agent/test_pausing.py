"""The pause line between the server and a consolidation process: real pipes, a real child, real torch passes.

The child's hooks are global to its process, so they are installed in a child, never in the test process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.pausing import PauseLine
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time, torch
from agent.pausing import follow_pauses
computes = follow_pauses(int(sys.argv[1]))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
if sys.argv[2] == "backward":
    loss = model(torch.randn(32, 64)).pow(2).mean()
    print("forward", flush=True)
    while computes.is_set():  # the pause has reached this process before the backward pass starts
        time.sleep(0.01)
    print("paused", flush=True)
    sys.stdin.readline()
    loss.backward()
    print("backward", flush=True)
    sys.stdin.readline()
else:
    step = 0
    while True:
        model(torch.randn(32, 64)).pow(2).mean().backward()
        step += 1
        print(step, flush=True)
"""


class Child:
    """The child process and the lines it printed, read in a thread."""

    def __init__(self, mode: str) -> None:
        self.line = PauseLine()
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(self.line.read_fd), mode], cwd=REPO,
                                        pass_fds=(self.line.read_fd,), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.line.child_started()
        self.printed: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for text in self.process.stdout:
            self.printed.append(text.strip())

    def tell(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def child(request: pytest.FixtureRequest):
    running = Child(request.param)
    yield running
    running.close()


@pytest.mark.parametrize("child", ["steps"], indirect=True)
def test_a_paused_process_takes_no_step_until_resumed_or_the_server_is_gone(child: Child) -> None:
    wait_for(lambda: len(child.printed) > 3, timeout=60, what="the child to compute")
    child.line(True)
    time.sleep(0.5)  # a step under way ends at its next module
    paused_at = len(child.printed)
    time.sleep(1.0)
    assert len(child.printed) == paused_at
    child.line(False)
    wait_for(lambda: len(child.printed) > paused_at + 3, what="the child to compute again")
    child.line(True)
    time.sleep(0.5)
    paused_at = len(child.printed)
    child.line.close()  # the server's end closed: nobody will resume it, so it computes
    wait_for(lambda: len(child.printed) > paused_at + 3, what="the child to compute once the line is closed")


@pytest.mark.parametrize("child", ["backward"], indirect=True)
def test_a_pause_holds_a_backward_pass_too(child: Child) -> None:
    wait_for(lambda: child.printed == ["forward"], timeout=60, what="the child's forward pass")
    child.line(True)
    wait_for(lambda: child.printed == ["forward", "paused"], what="the pause to reach the child")
    child.tell()  # now the backward pass
    time.sleep(1.0)
    assert child.printed == ["forward", "paused"]
    child.line(False)
    wait_for(lambda: child.printed == ["forward", "paused", "backward"], what="the backward pass once resumed")
    child.tell()
