"""sanaflow.gemma against transformers 5.23 on the same weights and files: Gemma2Model's last hidden state, the
folders its save_pretrained writes, and AutoTokenizer's ids; and TextEncoder.from_pretrained without transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

from sanaflow.gemma import Gemma2Config, JsonTokenizer, TokenizerNotReproducible, load_gemma2
from sanaflow.text import CHI_DIFFUSERS, TextConfig, TextEncoder
from tiny_text import make_tokenizer

ONE_THREAD = True

# Every feature on, each with a value no default would give: GQA (4 heads, 2 key/value heads), head_dim * heads !=
# hidden, query scalar != head_dim, small softcap (the q/k weights below make logits exceed it), a sliding window
# shorter than the sequences, explicit layer types, non-default RoPE base and eps.
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, attn_logit_softcapping=3.0,
            sliding_window=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0})


def hf_gemma(causal_lm=False, seed=0, **changes):
    """A random transformers Gemma-2 with every tensor off its init (norm offsets are 0 at init)."""
    cls = transformers.Gemma2ForCausalLM if causal_lm else transformers.Gemma2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(transformers.Gemma2Config(**{**TINY, **changes}, attn_implementation="eager")).eval()
        for name, p in model.named_parameters():
            scale = 1.0 if "q_proj" in name or "k_proj" in name else 0.2   # large logits: softcapping matters
            p.data = scale * torch.randn(p.shape)
    return model


def right_padded(batch_lengths, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(batch_lengths), length), generator=g)                  # (B, L)
    mask = (torch.arange(length)[None] < torch.tensor(batch_lengths)[:, None]).long()        # (B, L)
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_on_right_padded_batches(tmp_path, dtype):
    hf_gemma().save_pretrained(tmp_path)
    # Loaded as TextEncoder loaded it before: `.to(bfloat16)` would also round transformers' fp32 RoPE frequencies.
    ref = AutoModel.from_pretrained(tmp_path, local_files_only=True, dtype=dtype)
    model = load_gemma2(tmp_path, dtype=dtype)
    # 10 tokens, window 3: rows of 10, 6 and 1 real tokens; the last row's late pads see only padding in the window.
    ids, mask = right_padded([10, 6, 1], 10, TINY["vocab_size"])
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask)[0]
        got = model(ids, attention_mask=mask, use_cache=False)[0]
        no_mask = model(ids)[0]
    assert got.shape == (3, 10, 64) and got.dtype == dtype
    # The same ops in the same order give the same bits, padded positions included (TextEncoder's round trip in
    # test_text.py relies on it too); a looser tolerance would only hide a reordering.
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(no_mask[0], expected[0], atol=0, rtol=0)         # no padding: mask all ones


def test_default_layer_types_alternate_as_transformers():
    fields = {k: v for k, v in TINY.items() if k != "layer_types"}
    hf = transformers.Gemma2Config(**{**fields, "num_hidden_layers": 5})
    assert Gemma2Config.from_transformers(hf.to_dict()).layer_types == tuple(hf.layer_types)


@pytest.mark.parametrize("tied", [True, False])
def test_loads_causal_lm_folders_sharded(tmp_path, tied):
    # Untied: lm_head.weight is in the file and must be dropped; attention biases on for that case too.
    causal = hf_gemma(causal_lm=True, tie_word_embeddings=tied, attention_bias=not tied)
    causal.save_pretrained(tmp_path, max_shard_size="40KB")                      # index + shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids, mask = right_padded([7, 4], 7, TINY["vocab_size"], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(load_gemma2(tmp_path)(ids, attention_mask=mask)[0],
                                   causal.model(ids, attention_mask=mask)[0], atol=0, rtol=0)


def test_save_pretrained_is_a_transformers_folder(tmp_path):
    hf_gemma().save_pretrained(tmp_path / "src")
    model = load_gemma2(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    back = AutoModel.from_pretrained(tmp_path / "out", local_files_only=True, dtype=torch.float32)
    assert type(back).__name__ == "Gemma2Model" and back.config._attn_implementation == "eager"
    ids, mask = right_padded([9, 5], 9, TINY["vocab_size"], seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask)[0], back(ids, attention_mask=mask)[0],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, r"layer_types\[1\]"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"sliding_window": None}, "sliding_window"),
])
def test_bad_config_names_the_field_and_the_folder(tmp_path, change, field):
    hf_gemma().save_pretrained(tmp_path / "gemma")
    config = json.loads((tmp_path / "gemma" / "config.json").read_text())
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=rf"gemma.config\.json.*{field}"):
        load_gemma2(tmp_path / "gemma")
    if field != "model_type":              # TextEncoder loads other model types with transformers
        with pytest.raises(OSError, match=rf"text_encoder_dir='.*gemma'.*{field}"):
            TextEncoder.from_pretrained(tmp_path / "gemma")


def test_wrong_weights_name_the_folder(tmp_path):
    hf_gemma(num_hidden_layers=2, layer_types=None).save_pretrained(tmp_path / "gemma")
    config = json.loads((tmp_path / "gemma" / "config.json").read_text())
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3,
                                                                "layer_types": TINY["layer_types"]}))
    with pytest.raises(ValueError, match=r"gemma: weights do not fit.*layers\.2\."):
        load_gemma2(tmp_path / "gemma")


# ---- tokenizer ---------------------------------------------------------------------------------------------------

CHI = "\n".join(CHI_DIFFUSERS)
TEXTS = ["a cat", "", "  Leading and trailing  ", "Upper Case, digits 123 and ünïcode ✓", "tabs\tand\nnewlines",
         "<bos> and <pad> typed in the prompt", CHI + "a red cat", "A " + "very " * 40 + "long prompt"]


def legacy_gemma_folder(folder):
    """A transformers-4-style Gemma folder: no pre-tokenizer and no byte fallback in tokenizer.json (GemmaTokenizer
    rebuilds both), add_bos_token false in tokenizer_config.json (ignored next to a tokenizer.json) and a
    special_tokens_map.json."""
    make_tokenizer(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = None
    data["model"]["byte_fallback"] = False
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="GemmaTokenizerFast", add_bos_token=False, add_eos_token=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<bos>", "pad_token": "<pad>"}))


def byte_level_folder(folder):
    """The byte-level BPE tokenizer sanaflow.train_text trains (saved as TokenizersBackend)."""
    from sanaflow.train_text import train_tokenizer
    train_tokenizer(["a red circle", "two blue squares to the left of a yellow star"] * 3, 300).save_pretrained(
        str(folder))


@pytest.mark.parametrize("build", [make_tokenizer, legacy_gemma_folder, byte_level_folder])
def test_tokenizer_matches_auto_tokenizer(tmp_path, build):
    build(tmp_path)
    ref, tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True), JsonTokenizer.from_folder(tmp_path)
    assert (len(tok), tok.pad_token_id) == (len(ref), ref.pad_token_id)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok(text).input_ids == ref(text).input_ids and tok(text).attention_mask == ref(text).attention_mask
    assert tok.encode("a cat")[0] == 2                                        # <bos>, from the file's template
    calls = [dict(padding="longest", max_length=300, truncation=True),          # TextEncoder's two calls
             dict(padding="max_length", max_length=64, truncation=True),        # the CHI text is cut
             dict(padding="max_length", max_length=5, truncation=True),         # every text but "" is cut
             dict(padding="longest", max_length=5, truncation=True),
             dict(padding="max_length", max_length=80, truncation=True, add_special_tokens=False),
             dict(padding=True)]
    for kwargs in calls:
        got = tok(TEXTS, padding_side="right", return_tensors="pt", **kwargs)
        expected = ref(TEXTS, padding_side="right", return_tensors="pt", **kwargs)
        assert got.input_ids.dtype == got.attention_mask.dtype == torch.int64, kwargs
        assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.attention_mask,
                                                                              expected.attention_mask), kwargs
    padded = tok(["a cat"], padding="max_length", max_length=16, return_tensors="pt")   # class default side
    assert torch.equal(padded.input_ids, ref(["a cat"], padding="max_length", max_length=16,
                                             return_tensors="pt").input_ids)
    tok.save_pretrained(tmp_path / "saved")                                   # the files, as AutoTokenizer reads them
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")(TEXTS).input_ids == ref(TEXTS).input_ids


def test_tokenizers_it_cannot_reproduce_are_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")                         # SentencePiece only
    with pytest.raises(TokenizerNotReproducible, match="tokenizer.json"):
        JsonTokenizer.from_folder(tmp_path)
    make_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(TokenizerNotReproducible, match="LlamaTokenizer"):
        JsonTokenizer.from_folder(tmp_path)


# ---- TextEncoder.from_pretrained ---------------------------------------------------------------------------------


def test_text_encoder_loads_without_transformers(tmp_path):
    """A fresh interpreter loads a Gemma-2 folder and encodes without importing transformers (or torch._dynamo); its
    embeddings are those of transformers' Gemma2Model and AutoTokenizer."""
    tok = make_tokenizer(tmp_path / "tokenizer")
    ref = hf_gemma(vocab_size=len(tok))
    ref.save_pretrained(tmp_path / "text_encoder")
    cfg = TextConfig(max_length=24)
    expected = TextEncoder(ref, AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), cfg).encode(["a red cat", ""])
    script = (
        "import sys, torch\n"
        "from sanaflow.text import TextConfig, TextEncoder\n"
        f"enc = TextEncoder.from_pretrained({str(tmp_path / 'text_encoder')!r}, {str(tmp_path / 'tokenizer')!r}, "
        "config=TextConfig(max_length=24))\n"
        "emb, mask = enc.encode(['a red cat', ''])\n"
        # torch._dynamo too: importing it costs as much as transformers (nn.Embedding's init on the meta device does).
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m == 'torch._dynamo')\n"
        "assert not loaded, loaded\n"
        f"torch.save({{'emb': emb, 'mask': mask}}, {str(tmp_path / 'out.pt')!r})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["emb"], expected[0], atol=0, rtol=0)   # same ops in the same order
    assert torch.equal(got["mask"], expected[1])
