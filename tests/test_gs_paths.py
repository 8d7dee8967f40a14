"""gs:// wherever a local path works: the real code end to end against an in-memory bucket.

The stand-in is fsspec's MemoryFileSystem registered for the gs/gcs protocols, with the
directory semantics of an object store (no directories: `mkdir` does nothing and a folder exists
only while an object lies under it), and `etils.epath` switched to its fsspec backend for gs://
(EPATH_USE_TF=0; with TensorFlow installed it would otherwise pick tf.io.gfile's GCS client).
Objects are written whole, never appended to (as on GCS). Every byte the code writes to gs://
lands in the bucket's dict and every read comes from there, so each test compares what it reads
back (or what the bucket holds) with a local run.

Not covered here: Orbax checkpoints. Orbax writes arrays through TensorStore, whose own GCS
driver talks to the network and never sees an fsspec stand-in; `checkpoint.checkpoint_dir`
hands Orbax the gs:// URI unchanged. The bucket lives in this process, so the data pipeline
runs with thread workers (process workers would each see an empty bucket; real gs:// works from
any process).
"""

import json
import os
import shutil

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry  # What fsspec.filesystem(protocol) instantiates.
from PIL import Image

from ssr_jax.data import files, pipeline, superpixels, synthetic
from tests.data.conftest import synthetic_config

BUCKET = "gs://bucket"


class _Bucket(MemoryFileSystem):
  """gs://bucket/key -> bytes, in memory; `store` maps "/bucket/key" to the object."""

  protocol = ("gs", "gcs")
  root_marker = ""

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's option.
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    path = path.rstrip("/")
    return "/" + path.lstrip("/") if path else ""

  def _open(self, path, mode="rb", *args, **kwargs):
    # Objects are written whole: gcsfs refuses append/update modes with this same exception
    # type, so code that appends fails here as it would on a real bucket.
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"object stores cannot open {path} in mode {mode!r}")
    return super()._open(path, mode, *args, **kwargs)

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # An object store has no directories.

  def makedirs(self, path, exist_ok=False):
    pass


@pytest.fixture
def bucket(monkeypatch):
  """The objects written to gs:// in this test: {"/bucket/key": MemoryFile}."""
  cls = type("Bucket", (_Bucket,), {"store": {}, "pseudo_dirs": [""]})
  monkeypatch.setenv("EPATH_USE_TF", "0")
  for proto in ("gs", "gcs"):
    monkeypatch.setitem(_registry, proto, cls)
  gpath._is_tf_installed.cache_clear()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  yield cls.store
  gpath._is_tf_installed.cache_clear()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _objects(store, prefix) -> dict[str, bytes]:
  """{relative key: bytes} of the objects under gs://bucket/<prefix>/."""
  head = f"/bucket/{prefix}/"
  return {k[len(head) :]: v.getvalue() for k, v in store.items() if k.startswith(head)}


def _local_files(root) -> dict[str, bytes]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def test_stand_in_stores_bytes_and_fails_on_missing_objects(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A backend mix-up would write under ./gs:/...
  files.write_bytes(f"{BUCKET}/a/b.bin", b"\x00\x01")
  assert bucket["/bucket/a/b.bin"].getvalue() == b"\x00\x01"
  assert files.read_bytes(f"{BUCKET}/a/b.bin") == b"\x00\x01"
  with pytest.raises(FileNotFoundError):
    files.read_bytes(f"{BUCKET}/a/missing.bin")
  with pytest.raises(files.DataError, match="image file not found: gs://bucket/a/x.png"):
    files.read_image(f"{BUCKET}/a/x.png")
  assert not os.listdir(tmp_path)


def test_dataset_superpixels_and_batches_from_gs(bucket, tmp_path):
  kw = dict(num_train=6, num_val=2, size=64, seed=0)
  local = tmp_path / "data"
  assert synthetic.write_dataset(f"{BUCKET}/data", **kw)
  synthetic.write_dataset(str(local), **kw)
  assert not synthetic.write_dataset(f"{BUCKET}/data", **kw)  # spec.json read back: complete.
  written = _objects(bucket, "data")
  assert "spec.json" in written and "JPEGImages/train_00000.png" in written
  assert written == _local_files(local)

  cfg = dict(worker_type="thread", num_workers=2, color_clusters=4)
  cfg_gs = synthetic_config(f"{BUCKET}/data", **cfg)
  cfg_local = synthetic_config(str(local), **cfg)
  for split in ("train", "val"):
    out = superpixels.precompute(cfg_gs, split, workers=1, progress=False)
    assert not out["problems"] and out["written"] == out["total"] > 0
    assert out["dir"].startswith(f"{BUCKET}/data/Superpixels_")
    assert not superpixels.precompute(cfg_local, split, workers=1, progress=False)["problems"]
  written = _objects(bucket, "data")
  assert any(k.startswith("Superpixels_") and "/clusters_k4" in k for k in written)
  assert written == _local_files(local)
  again = superpixels.precompute(cfg_gs, "train", workers=1, progress=False)
  assert again["written"] == 0  # The gs:// files were found and validated.

  def take(data_cfg):
    it = pipeline.make_train_iterator(
      data_cfg,
      batch_size=2,
      seed=0,
      superpixels=True,
      clusters=True,
      pipeline="numpy",
      process_index=0,
      process_count=1,
    )
    with it:
      return [next(it) for _ in range(3)]

  got, want = take(cfg_gs), take(cfg_local)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # A file that is missing from the bucket is reported by its gs:// name.
  del bucket["/bucket/data/JPEGImages/train_00001.png"]
  with pytest.raises(files.DataError, match="gs://bucket/data/JPEGImages/train_00001.png"):
    take(cfg_gs)


def _upload(local_dir, prefix) -> str:
  for rel, data in _local_files(local_dir).items():
    files.write_bytes(f"{BUCKET}/{prefix}/{rel}", data)
  return f"{BUCKET}/{prefix}"


def _assert_trees_equal(a, b):
  from flax import traverse_util

  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def _check_cached_load(bucket, convert, load, local_weights, remote_weights, want, **kw):
  """Loads remote_weights (converted and cached in the local user cache dir, then in a gs://
  cache_dir) equal to `want`; spoils the source and loads again, which only the caches can
  serve."""
  from ssr_jax import weights_npz

  folder = remote_weights.rsplit("/", 1)[0].removeprefix(f"{BUCKET}/")
  before = set(_objects(bucket, folder))
  user = weights_npz.user_cache_dir()
  cached = set(user.iterdir()) if user.exists() else set()
  _assert_trees_equal(load(remote_weights, **kw)[1], want)
  assert set(_objects(bucket, folder)) == before  # Nothing written beside the source.
  (cache,) = set(user.iterdir()) - cached
  meta = convert.read_metadata(cache)
  assert meta["source_path"] == remote_weights
  sha = convert.weights_fingerprint(local_weights)
  assert meta["sha256"] == sha == convert.weights_fingerprint(remote_weights)
  cache_dir = f"{BUCKET}/cache/{folder}"
  _assert_trees_equal(load(remote_weights, cache_dir=cache_dir, **kw)[1], want)
  assert len(_objects(bucket, f"cache/{folder}")) == 1
  # Same size, so the source's stamp still matches: only a cache can give the weights now.
  files.write_bytes(remote_weights, b"\0" * len(files.read_bytes(remote_weights)))
  for where in (None, cache_dir):
    _assert_trees_equal(load(remote_weights, cache_dir=where, **kw)[1], want)
  with pytest.raises(
    ValueError, match=r"(model\.safetensors|dino\.pth): not a valid (CLIP|DINO) weights"
  ):
    load(remote_weights, cache_dir=f"{BUCKET}/other_cache", **kw)  # No cache: the spoilt bytes.


def test_clip_and_dino_weights_from_gs(bucket, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from ssr_jax.clip import convert as clip_convert
  from ssr_jax.dino import convert as dino_convert
  from tests.clip.clip_oracle import tiny_hf_config
  from tests.dino.dino_oracle import tiny_vit_config, to_dino_state_dict

  torch.manual_seed(0)
  transformers.CLIPModel._from_config(tiny_hf_config()).save_pretrained(tmp_path / "clip")
  vit = transformers.ViTModel._from_config(tiny_vit_config(), add_pooling_layer=False)
  vit.save_pretrained(tmp_path / "dino")
  torch.save(to_dino_state_dict(vit), tmp_path / "dino.pth")

  # CLIP: a Hugging Face directory in the bucket, converted once and cached.
  clip, want = clip_convert.load_clip(str(tmp_path / "clip"), cache_dir=tmp_path / "cache")
  remote = _upload(tmp_path / "clip", "clip")
  _check_cached_load(
    bucket,
    clip_convert,
    clip_convert.load_clip,
    str(tmp_path / "clip" / "model.safetensors"),
    f"{remote}/model.safetensors",
    want,
  )
  # DINO: a Hugging Face directory (read directly each time) and an official .pth (cached).
  dino, dino_want = dino_convert.load_dino(str(tmp_path / "dino"))
  _assert_trees_equal(dino_convert.load_dino(_upload(tmp_path / "dino", "dino"))[1], dino_want)
  pth = f"{BUCKET}/dino_pth/dino.pth"
  files.write_bytes(pth, (tmp_path / "dino.pth").read_bytes())
  load = dino_convert.load_dino
  _check_cached_load(
    bucket, dino_convert, load, str(tmp_path / "dino.pth"), pth, dino_want, heads=4
  )

  # Converted .npz files written to and read from gs://.
  for model, convert, load, params in (
    (clip, clip_convert, clip_convert.load_clip, want),
    (dino, dino_convert, dino_convert.load_dino, dino_want),
  ):
    saved = convert.save_converted(f"{BUCKET}/saved/{convert.__name__}.npz", model.cfg, params)
    assert f"{convert.__name__}.npz" in _objects(bucket, "saved")
    _assert_trees_equal(load(saved)[1], params)


def test_metrics_and_tensorboard_in_gs_workdir(bucket):
  from tensorboardX.proto import event_pb2

  from ssr_jax.train.metric_writer import MetricWriter

  workdir = f"{BUCKET}/run"
  w = MetricWriter(workdir)
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": 1.0 / step})
  w.write_scalars(3, {"miou": 0.5}, kind="eval")
  w.write_images(3, {"eval/x": np.zeros((4, 4, 3), np.uint8)})
  w.close()
  objs = _objects(bucket, "run")
  lines = [json.loads(x) for x in objs["train_metrics.jsonl"].decode().splitlines()]
  assert lines == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
  assert json.loads(objs["eval_metrics.jsonl"]) == {"step": 3, "miou": 0.5}
  events = [k for k in objs if k.startswith("tensorboard/events.out.tfevents.")]
  assert len(events) == 1
  data, tags = objs[events[0]], set()
  while data:  # TFRecord framing: length (8) + crc (4) + payload + crc (4).
    n = int.from_bytes(data[:8], "little")
    ev = event_pb2.Event.FromString(data[12 : 12 + n])
    tags |= {(v.tag, ev.step) for v in ev.summary.value}
    data = data[16 + n :]
  assert {("train/loss", 1), ("train/loss", 3), ("eval/miou", 3), ("eval/x", 3)} <= tags

  # Resuming from step 2 drops the later records from the gs:// files.
  MetricWriter(workdir, resume_step=2).close()
  lines = _objects(bucket, "run")["train_metrics.jsonl"].decode().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2]
  assert _objects(bucket, "run")["eval_metrics.jsonl"] == b""


def test_eval_outputs_predictions_and_scoring_on_gs(bucket, tmp_path):
  from ssr_jax import predict, score_pngs
  from ssr_jax.eval import png
  from ssr_jax.eval import run as eval_run
  from ssr_jax.train import checkpoint

  assert str(checkpoint.checkpoint_dir(f"{BUCKET}/run")) == f"{BUCKET}/run/checkpoints"
  res = {"miou": 0.25, "iou": [0.5, 0.0]}
  grid = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  eval_run._write(res, {"val_seg/img1": grid}, f"{BUCKET}/run", "val", "seg")
  objs = _objects(bucket, "run/eval")
  assert json.loads(objs["metrics_val_seg.json"]) == res
  eval_run.write_metrics(f"{BUCKET}/run", {"val": {"seg": {**res, "images": {"a": grid}}}})
  assert json.loads(_objects(bucket, "run/eval")["metrics.json"]) == {"val": {"seg": res}}
  np.testing.assert_array_equal(files.decode_image(objs["val_seg/vis/img1.png"], "vis"), grid)

  rng = np.random.default_rng(0)
  gt = rng.integers(0, 3, (5, 4, 7)).astype(np.uint8)
  pred = gt.copy()
  pred[:, :2] = 1
  for i in range(5):
    for root, a in ((f"{BUCKET}/gt", gt[i]), (f"{BUCKET}/pred", pred[i])):
      png.save_label_png(f"{root}/{i}.png", a, palette=png.VOC_PALETTE)
      png.save_label_png(tmp_path / root.rsplit("/", 1)[1] / f"{i}.png", a)
    np.testing.assert_array_equal(png.load_label_png(f"{BUCKET}/pred/{i}.png"), pred[i])
  conf, n, errors = score_pngs.evaluate_dirs(f"{BUCKET}/pred", f"{BUCKET}/gt", num_classes=3)
  want, _, _ = score_pngs.evaluate_dirs(tmp_path / "pred", tmp_path / "gt", num_classes=3)
  assert n == 5 and not errors
  np.testing.assert_array_equal(conf, want)

  # predict's inputs: images listed from a gs:// folder and decoded from the bucket.
  img = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
  local = tmp_path / "photo.png"
  Image.fromarray(img).save(local)
  shutil.copy(local, tmp_path / "notes.txt")
  for p in (local, tmp_path / "notes.txt"):
    files.write_bytes(f"{BUCKET}/photos/{p.name}", p.read_bytes())
  listed = predict.list_images([f"{BUCKET}/photos"])
  assert listed == [f"{BUCKET}/photos/photo.png"]
  np.testing.assert_array_equal(predict.read_rgb(listed[0]), img)
  with pytest.raises(OSError, match="gs://bucket/photos/none.png: cannot read image"):
    predict.read_rgb(f"{BUCKET}/photos/none.png")


def test_evaluation_from_gs_data_into_gs_workdir(bucket, tmp_path):
  """eval.run.evaluate end to end: a tiny random model, data and superpixels read from gs://,
  metrics, visualisations and prediction PNGs written to a gs:// workdir, equal to a local run."""
  import argparse

  import jax

  from benchmarks.common import bench_config, random_setup
  from configs import base
  from ssr_jax.eval import run as eval_run

  def setup(root):
    synthetic.write_dataset(root, num_train=2, num_val=3, size=64, seed=0)
    config = bench_config(argparse.Namespace(small=True, batch=2, crop=64, dtype="float32"))
    data = base.get_config().data
    data.update(
      name="synthetic",
      root=root,
      train_split="train",
      val_split="val",
      num_classes=7,
      crop_size=64,
      num_workers=1,
      worker_type="thread",
    )
    config.data = data
    config.model.class_names = synthetic.SPEC.class_names
    config.eval.long_side = 64
    config.eval.num_vis = 1
    superpixels.precompute(config.data, "val", workers=1, progress=False)
    return config

  results = {}
  for where, root, workdir in (
    ("gs", f"{BUCKET}/data", f"{BUCKET}/run"),
    ("local", str(tmp_path / "data"), str(tmp_path / "run")),
  ):
    config = setup(root)
    task, frozen, batch = random_setup(config, small=True)
    variables = task.init(jax.random.PRNGKey(0), batch)
    kw = dict(task=task, frozen=frozen, variables=variables, step=0, split="val")
    results[where] = eval_run.evaluate(config, workdir, target="seg", **kw)
  drop = ("seconds", "images")
  assert {k: v for k, v in results["gs"].items() if k not in drop} == {
    k: v for k, v in results["local"].items() if k not in drop
  }
  written, local = _objects(bucket, "run"), _local_files(tmp_path / "run")
  assert written.keys() == local.keys()
  for k in written:  # Bit-identical, but for the timings in the metrics files.
    if k.endswith(".json"):
      a, b = json.loads(written[k]), json.loads(local[k])
      assert a.pop("seconds") > 0 and b.pop("seconds") > 0 and a == b, k
    else:
      assert written[k] == local[k], k
  assert sorted(k for k in written if k.startswith("eval/val_seg/pred/")) == [
    f"eval/val_seg/pred/val_0000{i}.png" for i in range(3)
  ]
  assert json.loads(written["eval/metrics_val_seg.json"])["num_images"] == 3


def test_tfds_build_into_gs(bucket, tmp_path):
  """A TFDS build straight into gs://: the same shards and metadata as a local build, uploaded
  shard by shard, and a rerun re-uploads only what is missing. (Reading records back goes
  through array_record's own GCS client, which this stand-in cannot serve.)"""
  pytest.importorskip("tensorflow_datasets")
  from ssr_jax.data import records, tfds_build

  root = tmp_path / "data"
  synthetic.write_dataset(str(root), num_train=4, num_val=5, size=32, seed=0)
  cfg = synthetic_config(root, tfds_data_dir=str(tmp_path / "tfds"))
  local = tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=2)
  cfg.tfds_data_dir = f"{BUCKET}/tfds"
  remote = tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=2)
  assert str(remote) == f"{BUCKET}/tfds/ssr_synthetic/plain/1.0.0"
  want = _local_files(local)
  got = _objects(bucket, "tfds/ssr_synthetic/plain/1.0.0")
  shards = sorted(k for k in want if ".array_record-" in k)
  assert len(shards) == 3 and all(got[k] == want[k] for k in shards)
  assert json.loads(got["metadata.json"]) == json.loads(want["metadata.json"])
  assert "dataset_info.json" in got
  tcfg = synthetic_config(root, tfds_data_dir=f"{BUCKET}/tfds", source="tfds")
  assert records.build_dir(tcfg, maps=False) == remote  # Found through epath on gs://.
  key = f"/bucket/tfds/ssr_synthetic/plain/1.0.0/{shards[1]}"
  kept = bucket[f"/bucket/tfds/ssr_synthetic/plain/1.0.0/{shards[0]}"]
  del bucket[key]
  tfds_build.build(cfg, ["val"], superpixels=False, workers=1, shard_size=2)
  assert bucket[key].getvalue() == want[shards[1]]
  assert bucket[f"/bucket/tfds/ssr_synthetic/plain/1.0.0/{shards[0]}"] is kept  # Not rewritten.
