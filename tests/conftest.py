"""Test setup: 8 simulated CPU devices (must precede the first jax import), float32 matmuls and
a temporary user cache directory."""

import os
import sys
import tempfile

# torch 2.13's Python 3.12 wheel is its CUDA build, whose triton segfaults when loaded into a
# process that has loaded TensorFlow (transformers' model classes import it through
# torch._dynamo). The parity oracles run torch on the CPU and never need triton; a None entry
# makes `import triton` raise ImportError, which torch handles.
sys.modules.setdefault("triton", None)

# Converted weights go to the user cache dir by default: never the tester's own ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ssr_jax_test_cache_")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

if os.environ.get("PYTEST_XDIST_WORKER"):
  # xdist's workers run from execnet's `python -c` bootstrap, whose __main__ has no file, so
  # ssr_jax.data.parallel would take its thread fallback. The functions the tests hand to
  # worker processes live in importable modules, as in a serial run: keep the process paths.
  from ssr_jax.data import parallel  # noqa: E402

  parallel.main_is_importable = lambda: True
