"""The adversarial suite (``agent bench abuse``) against a real ``agent serve`` on the tiny model: every attack holds.

It prints its table (``pytest -s`` shows it; CI's log keeps it), so the run says how many attacks were tried
and how many held.
"""

from __future__ import annotations

from bench import abuse


def test_every_attack_a_client_can_try_holds(tiny_model_dir, tmp_path):
    result = abuse.run(str(tiny_model_dir), tmp_path)
    print("\n" + abuse.report(result))
    failed = [a for a in result["attacks"] if not a["held"]]
    assert result["tried"] >= 15 and not failed, failed
