"""Offline CLIP BPE tokenizer (no downloads).

vocab.json / merges.txt are derived from OpenAI's bpe_simple_vocab_16e6.txt.gz (shipped in this
package, MIT, see BPE_VOCAB_NOTICE.txt) exactly as openai/clip's SimpleTokenizer builds its
vocabulary, then loaded with transformers' CLIPTokenizer.from_pretrained (environment.md
pitfall 3: constructing CLIPTokenizer from file arguments directly gives wrong ids in 5.x).
"""

import functools
import gzip
import json
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # Lines 1..48894 of the merges file; 49408 vocab entries in total.


def _bytes_to_unicode() -> dict[int, str]:
  """OpenAI's reversible byte -> printable unicode map (printable bytes map to themselves)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  bs += list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _merges() -> list[tuple[str, str]]:
  data = resources.files("ssr_jax.clip").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
  lines = gzip.decompress(data).decode("utf-8").split("\n")
  return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # Line 0 is a header.


def write_vocab_files(directory) -> tuple[Path, Path]:
  """Writes vocab.json and merges.txt (transformers' CLIP format) into directory; returns paths."""
  merges = _merges()
  vocab = list(_bytes_to_unicode().values())
  vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / "vocab.json").write_text(
    json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
  )
  header = "#version: 0.2\n"
  (d / "merges.txt").write_text(
    header + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
  )
  # Names the class, so from_pretrained does not guess one (and warn) from the files.
  (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
  return d / "vocab.json", d / "merges.txt"


@functools.cache
def load_tokenizer():
  """transformers.CLIPTokenizer built from the packaged BPE file (memoised: it is immutable)."""
  from transformers import CLIPTokenizer

  with tempfile.TemporaryDirectory() as d:
    write_vocab_files(d)
    # Files are read into memory here, so the temporary directory can go afterwards.
    tok = CLIPTokenizer.from_pretrained(d, model_max_length=1 << 30)
  if len(tok) != 49408 or tok.convert_tokens_to_ids(EOT) != 49407:
    raise RuntimeError(f"derived CLIP vocabulary is wrong ({len(tok)} entries)")
  return tok


def tokenize(texts: str | Sequence[str], context_length: int = 77, *, tokenizer=None) -> np.ndarray:
  """Texts -> int32 [N, context_length]: SOT, BPE ids, EOT, then zeros (as openai/clip).

  Too-long texts are cut to context_length with EOT kept as the last token (openai/clip's
  truncate=True), so EOT stays the argmax that the text tower pools on.
  """
  if isinstance(texts, str):
    texts = [texts]
  tok = tokenizer or load_tokenizer()
  eot = tok.convert_tokens_to_ids(EOT)
  out = np.zeros((len(texts), context_length), np.int32)
  for i, text in enumerate(texts):
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if len(ids) > context_length:
      ids = ids[:context_length]
      ids[-1] = eot
    out[i, : len(ids)] = ids
  return out
