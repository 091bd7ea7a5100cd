"""What ``store`` must not pull in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_store_imports_no_model_agent_or_policy_code() -> None:
    code = (
        "import sys, store; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'agent', 'policies'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
