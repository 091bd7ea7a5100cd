"""Pure decision logic of s2agent: no I/O, no model, no store; everything here is testable with a
scripted language model.

- ``policies.answers``: reading final answers out of model text and normalising them.
- ``policies.consistency``: the unsupervised filters (majority vote, position consistency,
  universal self-consistency) that decide which System 2 answers become training examples.
- ``policies.routing``: System 1 confidence estimators, routers, and threshold calibration.
- ``policies.scoping``: which scoped adapter an untagged input belongs to (nearest known input).
- ``policies.sources``: per-source caps on what one consolidation trains on (no client outweighs the rest).
- ``policies.system2``: the System 2 methods (CoT, RaR, S2A, BSM, PAL), one module each.
- ``policies.variations``: a question's wording and a program's template, to vary solved questions.
"""
