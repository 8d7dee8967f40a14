"""Offline CLIP tokenizer vs transformers' Rust CLIPTokenizerFast built from the same files."""

import json

import numpy as np
import pytest

from ssr_jax.clip.tokenizer import load_tokenizer, tokenize, write_vocab_files

PROMPTS = [
  "a photo of a cat",
  "a clean origami person with clothes,people,human.",
  "Hello, World!! It's 3.14159 -- or 42%? (yes) [no] {maybe} #tag @user",
  "café naïve résumé Straße ÉCOLE",
  "emoji 😀🐱 and 中文 字符 ½ ①",
  "  multiple   spaces\tand\nnewlines  ",
  "don't we'll they're I'M",
]


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  d = tmp_path_factory.mktemp("bpe")
  write_vocab_files(d)
  return transformers.CLIPTokenizerFast.from_pretrained(d)


def test_known_ids():
  ids = tokenize(["a photo of a cat"])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  # openai/clip's published ids for this prompt (SOT a photo of a cat EOT), then zero padding.
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert not ids[0, 7:].any()


def test_vocab_files(tmp_path):
  vocab_path, merges_path = write_vocab_files(tmp_path)
  vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
  assert len(vocab) == 49408
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407
  merges = merges_path.read_text(encoding="utf-8").splitlines()
  assert merges[0].startswith("#version") and len(merges) == 1 + 48894
  assert vocab["".join(merges[1].split())] == 512  # The first merge follows the 512 byte tokens.


def test_matches_fast_tokenizer(fast):
  ours = tokenize(PROMPTS)
  for text, row in zip(PROMPTS, ours):
    want = fast(text)["input_ids"]
    assert row[: len(want)].tolist() == want, text
    assert not row[len(want) :].any()


def test_ftfy_cleaning_like_openai():
  # openai/clip runs ftfy.fix_text first (the Rust tokenizer only applies NFC), which expands
  # ligatures and unescapes HTML entities; ours follows openai/clip. transformers' CLIPTokenizer
  # does so only where ftfy is installed (requirements.txt pins it; bare GPU images may lack it).
  pytest.importorskip("ftfy")
  a, b = tokenize(["ﬁsh &amp; chips", "fish & chips"])
  assert a.tolist() == b.tolist()


def test_truncation_keeps_eot():
  long = " ".join(["word"] * 100)
  ids = tokenize([long, "short"], context_length=20)
  assert ids.shape == (2, 20)
  assert ids[0, 0] == 49406 and ids[0, -1] == 49407
  assert (ids[0, 1:-1] == load_tokenizer().convert_tokens_to_ids("word</w>")).all()
  assert ids[1].argmax() == 2 and ids[1, 2] == 49407  # Argmax pooling finds EOT.
