"""CLIP image-encoder throughput: our jitted Flax `encode_image` vs transformers' PyTorch
`CLIPVisionModelWithProjection` holding the same (random) weights.

`python -m benchmarks clip [--small] [--batch 8] [--sizes 224,320] [--dtype float32]`.
Images/s per resolution and ratio = torch time / our time (> 1: ours is faster); torch runs with
as many threads as CPUs, timed calls of the two alternate so both see the same machine load.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from ssr_jax import testing
from ssr_jax.clip import CLIP, CONFIGS, CLIPConfig, init_params
from ssr_jax.clip.convert import params_from_state_dict
from ssr_jax.clip.model import cast_for_compute


def add_args(p):
  p.add_argument("--arch", default="ViT-B/16", choices=sorted(CONFIGS))
  common.add_model_args(p, batch=8, crop=None, dtype="float32")
  p.add_argument("--sizes", default="224,320", help="comma-separated square input sizes")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the torch baseline")


def hf_config(c: CLIPConfig):
  """transformers.CLIPConfig equivalent to ours (quick_gelu, the same MLP widths)."""
  import transformers

  return transformers.CLIPConfig(
    text_config=dict(
      hidden_size=c.text_width,
      intermediate_size=c.text_mlp or 4 * c.text_width,
      num_hidden_layers=c.text_layers,
      num_attention_heads=c.text_heads,
      max_position_embeddings=c.context_length,
      vocab_size=c.vocab_size,
      projection_dim=c.embed_dim,
    ),
    vision_config=dict(
      hidden_size=c.vision_width,
      intermediate_size=c.vision_mlp or 4 * c.vision_width,
      num_hidden_layers=c.vision_layers,
      num_attention_heads=c.vision_heads,
      image_size=c.image_size,
      patch_size=c.patch_size,
      projection_dim=c.embed_dim,
    ),
    projection_dim=c.embed_dim,
  )


def _torch_models(cfg, on_gpu, dtype):
  """(random transformers CLIPModel state dict as numpy, vision tower with the same weights)."""
  import torch
  import transformers

  torch.manual_seed(0)
  full = transformers.CLIPModel(hf_config(cfg))
  sd = {k: v.detach().numpy() for k, v in full.state_dict().items()}
  vision = transformers.CLIPVisionModelWithProjection(full.config.vision_config)
  vision.load_state_dict(
    {
      k: v
      for k, v in full.state_dict().items()
      if k.startswith(("vision_model.", "visual_projection."))
    }
  )
  vision.eval().to("cuda" if on_gpu else "cpu", getattr(torch, dtype))
  return sd, vision


def _torch_fn(vision, on_gpu):
  import torch

  def fn(x):
    with torch.inference_mode():
      out = vision(pixel_values=x, interpolate_pos_encoding=True).image_embeds
      if on_gpu:
        torch.cuda.synchronize()
      return out

  return fn


def run(args) -> dict:
  cfg = testing.TINY_CLIP if args.small else CONFIGS[args.arch]
  sizes = [32, 48] if args.small else [int(s) for s in args.sizes.split(",")]
  batch = 2 if args.small else args.batch
  on_gpu = jax.default_backend() == "gpu"
  use_torch = args.torch
  if use_torch:
    try:
      import torch
    except ImportError:
      use_torch = False
  result = dict(arch="small" if args.small else args.arch, batch=batch, dtype=args.dtype)

  if use_torch:
    torch.set_num_threads(os.cpu_count())
    sd, vision = _torch_models(cfg, on_gpu, args.dtype)
    params = params_from_state_dict(sd, cfg)
    result["torch_threads"] = torch.get_num_threads()
    result["torch_attn"] = vision.config._attn_implementation
  else:
    params = init_params(CLIP(cfg), jax.random.key(0))
  # Bicubic: what transformers' interpolate_pos_encoding does, so outputs are comparable.
  model = CLIP(cfg, dtype=jnp.dtype(args.dtype), pos_interp="bicubic")
  # Params are an argument (not closed-over constants) so compilation does not embed weights.
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))
  params = jax.device_put(cast_for_compute(params, jnp.dtype(args.dtype)))  # As torch's bf16 model.

  peak = common.peak_flops()
  rng = np.random.default_rng(0)
  for s in sizes:
    x = rng.standard_normal((batch, s, s, 3)).astype(np.float32)
    xj = jax.device_put(x)
    fns = {"ours": (encode, (params, xj))}
    if use_torch:
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(
        "cuda" if on_gpu else "cpu", getattr(torch, args.dtype)
      )
      fns["torch"] = (_torch_fn(vision, on_gpu), (xt,))
    times = common.time_interleaved(fns, warmup=2, iters=args.iters)
    t = times["ours"]
    flops = common.flops_of(encode, params, xj)
    row = dict(
      ours_img_s=batch / t["median_s"],
      ours_median_s=t["median_s"],
      ours_compile_s=t["compile_s"],
      gflop_per_img=flops / batch / 1e9 if flops else None,
    )
    if flops:
      row["ours_gflop_s"] = flops / t["median_s"] / 1e9
      if peak:
        row["ours_mfu"] = flops / t["median_s"] / peak
    if use_torch:
      tt = times["torch"]
      row |= dict(
        torch_img_s=batch / tt["median_s"],
        torch_median_s=tt["median_s"],
        ratio=tt["median_s"] / t["median_s"],
      )
      # Same weights, same inputs: the outputs must agree (a guard against benchmarking a bug).
      ours = np.asarray(encode(params, xj), np.float32)
      theirs = fns["torch"][0](xt).float().cpu().numpy()
      row["max_abs_diff"] = float(np.abs(ours - theirs).max())
    result[f"{s}px"] = row
  result["config"] = dataclasses.asdict(cfg)
  return result
