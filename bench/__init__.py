"""Benchmarks that print numbers: ``agent bench system1 | system2 | paper | loop | serving | consolidation``.

Each module starts with the command that runs it. Task generators (:mod:`bench.tasks`) make the
paper's synthetic tasks locally, with fixed seeds and disjoint train / eval splits.
"""
