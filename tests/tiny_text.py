"""Tiny, fully offline stand-ins for SANA's Gemma-2 text encoder and tokenizer (diffusers-interop §7.1-7.2).

    tok = make_tokenizer()                     # GemmaTokenizer, ~390 tokens, adds <bos>, byte fallback
    gemma = make_gemma(len(tok))               # random Gemma2Model, hidden 8, 1 layer, 2 heads of 16
    tok.save_pretrained(d); gemma.save_pretrained(d)   # AutoTokenizer / AutoModel reload them offline

The tokenizer behaves like Gemma's SentencePiece BPE on the points SANA depends on: spaces become "▁",
<bos> is prepended, unknown characters fall back to bytes, and "▁" merges with a following letter, so that
the CHI's trailing "User Prompt: " space joins the first word of a prompt ("▁a"), as with the real Gemma
vocabulary. Digits and punctuation do not merge with "▁" (a prompt starting with "3" keeps a lone "▁").
Whole-word tokens for the CHI's words and a few prompt words keep the CHI short (~200 tokens, close to
Gemma's count) so that CHI tests stay fast; any other word is spelled letter by letter.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, GemmaTokenizer

from sanaflow.text import CHI_DIFFUSERS, simple_tokenizer

PROMPT_WORDS = {"cat", "dog", "red", "apples", "on", "the", "very", "long", "sitting", "mat", "blurry", "low"}
WORDS = sorted(set(re.findall(r"[A-Za-z]+", " ".join(CHI_DIFFUSERS))) | PROMPT_WORDS)


def make_tokenizer(save_dir: str | Path | None = None) -> GemmaTokenizer:
    """The library's offline Gemma-style tokenizer with the CHI's words and a few prompt words as single tokens;
    written to `save_dir` (tokenizer.json + config) if given."""
    tokenizer = simple_tokenizer(WORDS)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def gemma_config(vocab_size: int, **changes) -> Gemma2Config:
    """diffusers' test config (tests/pipelines/sana/test_sana.py) with our vocabulary; override any field."""
    fields = dict(head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=16,
                  max_position_embeddings=8192, num_attention_heads=2, num_hidden_layers=1,
                  num_key_value_heads=2, vocab_size=vocab_size, attn_implementation="eager")
    return Gemma2Config(**{**fields, **changes})


def make_gemma(vocab_size: int, seed: int = 0, causal_lm: bool = False, **changes) -> Gemma2Model:
    """A random tiny Gemma2Model (or Gemma2ForCausalLM), eval mode, float32; same seed, same weights.

    The seed is applied inside `fork_rng`, so the caller's global RNG state is left untouched.
    """
    cls = Gemma2ForCausalLM if causal_lm else Gemma2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(gemma_config(vocab_size, **changes))
    return model.eval()
