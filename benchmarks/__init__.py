"""Benchmarks, run from a source checkout: `python -m benchmarks NAME [--small] [--device gpu]`.

Not part of the installed package (they use the repository's configs/). Each benchmark lives in
benchmarks/<NAME>.py with `run(args) -> dict` and optionally `add_args(parser)`, and is listed in
__main__.BENCHES; common.py holds the shared machine, timing and setup helpers. The random
models and batches come from ssr_jax.testing, shared with the tests.
"""
