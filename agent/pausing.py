"""A consolidation process that pauses while users are served: the line between it and the server.

The server's engine decides when the training process computes (:meth:`BatchingBackend.lend_cores
<agent.backends.batching.BatchingBackend.lend_cores>`, :class:`policies.yielding.TrainerTurns`) and says so
through a pipe the process inherits (:class:`PauseLine`, one byte per change). In the process,
:func:`follow_pauses` reads the pipe in a thread and makes every forward pass and every backward pass wait,
module by module, while it is paused: training steps, the gate's System 1 answers and the retention answers
alike, with nothing to change in the code that runs them. Waiting happens only inside model computations,
never inside a store transaction, so a paused process holds no lock the server could wait on.

A pause is seen at the next module boundary (every linear layer is one; in a backward pass, every module
output that needs a gradient). Loading the model is not paused (it runs once per process). The hooks cost
nothing measurable: two steps of the embedded model's training took 9.2-10.0 s with them, 9.4-11.1 s
without, to the same loss.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

PAUSE, RESUME = b"p", b"r"


class PauseLine:
    """The server's end of the pipe: call it with True to pause the process, False to let it compute.

    The read end (:attr:`read_fd`) is handed to the child (``Popen(pass_fds=...)``) and closed here once the
    child has started (:meth:`child_started`). Writes never block: a write that would (the child stopped reading,
    64 KiB of changes behind) or that finds the child gone is dropped."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._read_open = True

    def __call__(self, paused: bool) -> None:
        try:
            os.write(self._write_fd, PAUSE if paused else RESUME)
        except OSError:  # BlockingIOError, BrokenPipeError: nobody to tell
            pass

    def child_started(self) -> None:
        """The child holds its own copy of the read end now."""
        self._close_read()

    def close(self) -> None:
        self._close_read()
        os.close(self._write_fd)

    def _close_read(self) -> None:
        if self._read_open:
            self._read_open = False
            os.close(self.read_fd)


def follow_pauses(fd: int) -> threading.Event:
    """In the training process: obey the server's pauses on ``fd`` from now on; the event is set while it may
    compute. The pipe's end (the server gone) lets it compute for good: the process then stops by itself
    (:mod:`agent.worker` watches its parent)."""
    computes = threading.Event()
    computes.set()

    def read() -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(4096):
                if chunk[-1:] == PAUSE:  # only the last change counts
                    computes.clear()
                else:
                    computes.set()
        computes.set()

    threading.Thread(target=read, name="follow-pauses", daemon=True).start()
    _wait_in_every_module(computes)
    return computes


def _wait_in_every_module(computes: threading.Event) -> None:
    """Global module hooks: each module's forward waits for ``computes`` before it runs, and, where its output
    takes part in a backward pass, the backward waits there too (a hook on that output's gradient)."""

    def before_forward(module: torch.nn.Module, args: Any) -> None:
        computes.wait()

    def wait_in_backward(grad: torch.Tensor) -> None:
        computes.wait()

    def after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
            output.register_hook(wait_in_backward)

    torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
    torch.nn.modules.module.register_module_forward_hook(after_forward)
