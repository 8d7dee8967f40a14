"""`python -m benchmarks {clip,model,train,input,superpixels,eval,predict,rehearsal,all}
[--out FILE] [--device cpu|gpu] [--small]`: runs benchmark modules, prints the machine and a
table, writes JSON. Run it from the repository root."""

import argparse
import importlib
import importlib.util
import json
import os
import sys

# Modules of this package, imported by name and only when asked for: one module's optional
# dependency (torch, TensorFlow, OpenCV) must not break the others, and --device must be set
# before jax starts. Add a benchmark by adding its module name here.
BENCHES = ("clip", "model", "train", "input", "superpixels", "eval", "predict", "rehearsal")


def _available(name: str) -> bool:
  # Only a module that does not exist is "not available"; errors inside one propagate.
  return importlib.util.find_spec(f"benchmarks.{name}") is not None


def _common_args(p):
  p.add_argument("--out", default="", help="write the results as JSON to this file")
  p.add_argument(
    "--device", choices=("cpu", "gpu"), default=None, help="JAX platform (default: jax's choice)"
  )
  p.add_argument("--small", action="store_true", help="tiny sizes: a smoke test")


def _defaults(module) -> dict:
  """A module's own argument defaults (used when it runs under `all`)."""
  p = argparse.ArgumentParser(add_help=False)
  _common_args(p)
  if hasattr(module, "add_args"):
    module.add_args(p)
  return vars(p.parse_args([]))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  # The platform must be fixed before the benchmark modules import jax.
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--device", choices=("cpu", "gpu"), default=None)
  device = pre.parse_known_args(argv)[0].device
  if device:
    os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[device]

  wanted = next((a for a in argv if a in BENCHES + ("all",)), None)
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  sub = parser.add_subparsers(dest="bench", required=True)
  modules = {}
  for name in BENCHES:
    p = sub.add_parser(name)
    _common_args(p)
    if wanted in (name, "all") and _available(name):
      modules[name] = importlib.import_module(f"benchmarks.{name}")
      if wanted == name and hasattr(modules[name], "add_args"):
        modules[name].add_args(p)
  _common_args(sub.add_parser("all", help="every available benchmark with its defaults"))
  args = parser.parse_args(argv)

  from benchmarks import common

  device = common.device_info()
  print(common.machine_line(device), flush=True)  # First, so a log names its machine.
  names = BENCHES if args.bench == "all" else (args.bench,)
  results = {}
  for name in names:
    if name not in modules:
      results[name] = "not available"
      continue
    if args.bench == "all":
      run_args = argparse.Namespace(
        **(_defaults(modules[name]) | {"out": args.out, "device": args.device, "small": args.small})
      )
    else:
      run_args = args
    results[name] = modules[name].run(run_args)
  results = results if args.bench == "all" else {args.bench: results[args.bench]}
  results["machine"] = common.machine_line(device)
  results["device"] = device
  common.print_table(results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2, default=str)
  return results


if __name__ == "__main__":
  main()
