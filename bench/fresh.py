"""Run a measurement in a fresh Python process, and get its JSON result back.

Why: torch's OpenMP build gives each thread that runs a parallel op a team of its own, and once a process has
more OpenMP threads than cores GNU OpenMP stops spin-waiting between parallel regions. A bare-engine figure
measured in the main thread of a process whose serving engine runs in another thread is therefore measured
slowed (a bfloat16 decode step: 0.065 s instead of 0.040), and it slows the server measured after it. A fresh
process runs torch in one thread only, as the engine does in the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_RUN = "import json, sys; from {module} import {name}; print(json.dumps({name}(*json.loads(sys.argv[1]))))"


def call(module: str, name: str, *args: Any, timeout: float = 3600) -> Any:
    """``module.name(*args)`` in a fresh interpreter; ``args`` and the result must be JSON. Its stderr is passed on."""
    done = subprocess.run([sys.executable, "-c", _RUN.format(module=module, name=name), json.dumps(args)],
                          stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{name} failed in its process (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])
