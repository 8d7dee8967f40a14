"""Benchmarks: `python -m ssr_jax.bench {clip,model,train,input,superpixels,eval,all}`.

Each benchmark lives in ssr_jax/bench/<name>.py with `run(args) -> dict` and optionally
`add_args(parser)`; common.py holds the shared timing/device helpers.
"""
