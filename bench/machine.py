"""What a benchmark ran on, written into its results: greedy answers depend on it.

The same code and weights can give different greedy answers on two machines: the embedded model in bfloat16
answered 53 of the 128 general facts of ``agent bench general`` differently on two 2-core machines (likely
their CPU kernels rounding differently; library versions were not recorded then), so its runs compare only on
one machine, and the results say which.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    """The CPU, how many cores, the kernels torch picked for it, whether it computes bfloat16 natively (then a
    consolidation trains under bf16 autocast, :func:`agent.training.use_bf16`), and the library versions."""
    import torch
    import transformers

    from agent.training import cpu_supports_bf16

    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_supports_bf16(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
