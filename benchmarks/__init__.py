"""curvprune's benchmark suite: ``python -m benchmarks`` lists, runs and documents the scripts.

Every ``benchmarks/<name>.py`` whose name does not start with ``_`` is a benchmark (see
benchmarks/README.md for the convention); :mod:`benchmarks._suite` discovers and runs them.
"""
