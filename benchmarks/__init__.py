"""Benchmarks of a2a-redis, each figure measured beside its anchors in the same run.

Run with ``python -m benchmarks`` (``make bench``); ``--help`` lists the options. Each
benchmark is a module exposing a :class:`benchmarks.common.Benchmark`, listed in
``benchmarks.registry.BENCHMARKS``.
"""
