"""sanaflow.text against diffusers' SanaPipeline.encode_prompt (0.42.1) on a tiny offline Gemma-2."""
import dataclasses
import inspect

import pytest
import torch
from diffusers import SanaPipeline

from sanaflow.text import CHI_DIFFUSERS, CHI_NVLABS, TEXT_PRESETS, TextConfig, TextEncoder
from tiny_text import make_gemma, make_tokenizer

# Same weights and the same ops in the same order, so results agree to float rounding; the only
# difference allowed is kernel blocking, because we encode a string negative prompt once and repeat it
# while diffusers runs a batch of copies.
ATOL = 1e-6

PROMPTS = [
    "  A Cat sitting on a MAT  ",           # mixed case, surrounding spaces
    "dog",
    "",
    "3 red apples",                         # starts with a digit: no "▁" merge (see test_chi_window_start)
    "A " + "very " * 320 + "long prompt",   # > 300 tokens: right truncation at both lengths
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def gemma(tok):
    return make_gemma(len(tok))


@pytest.fixture(scope="module")
def pipe(tok, gemma):
    # encode_prompt touches only the tokenizer and the text encoder.
    return SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=None, transformer=None, scheduler=None)


def diffusers_encode(pipe, prompts, chi, max_length, negative_prompt="", n=1):
    return pipe.encode_prompt(prompts, negative_prompt=negative_prompt, num_images_per_prompt=n,
                              device=torch.device("cpu"), max_sequence_length=max_length,
                              complex_human_instruction=list(chi) if chi else None)


def assert_same(ours, theirs):
    embeds, mask, neg_embeds, neg_mask = theirs
    torch.testing.assert_close(ours.text, embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.null_text, neg_embeds, atol=ATOL, rtol=0)
    assert torch.equal(ours.text_mask, mask) and ours.text_mask.dtype == torch.int64
    assert torch.equal(ours.null_mask, neg_mask) and ours.null_mask.dtype == torch.int64


def test_chi_is_diffusers_default_and_nvlabs_differs_only_in_quotes():
    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert CHI_DIFFUSERS == tuple(default)
    assert TextConfig().chi == CHI_DIFFUSERS and TextConfig() == TEXT_PRESETS["diffusers"]
    assert CHI_NVLABS[0].startswith('Given a user prompt, generate an "Enhanced prompt" that provides')
    assert CHI_NVLABS[0].replace('"', "'") == CHI_DIFFUSERS[0] and CHI_NVLABS[1:] == CHI_DIFFUSERS[1:]
    assert CHI_NVLABS[-1] == "User Prompt: "                      # trailing space (sana-spec §3.3)


@pytest.mark.parametrize("max_length", [16, 300])
@pytest.mark.parametrize("chi", [CHI_DIFFUSERS, None], ids=["chi", "no-chi"])
def test_matches_diffusers_encode_prompt(tok, gemma, pipe, chi, max_length):
    enc = TextEncoder(gemma, tok, TextConfig(max_length=max_length, chi=chi))
    for negative in ("", "  Blurry, LOW quality "):
        ours = enc.encode_for_cfg(PROMPTS, negative_prompt=negative)
        assert ours.text.shape == (len(PROMPTS), max_length, gemma.config.hidden_size)
        assert_same(ours, diffusers_encode(pipe, PROMPTS, chi, max_length, negative))
    embeds, mask = enc.encode(PROMPTS)                           # the plain API gives the same tensors
    torch.testing.assert_close(embeds, ours.text, atol=0, rtol=0)
    assert torch.equal(mask, ours.text_mask)
    assert mask[-1].all()                                        # the long prompt fills the window


def test_chi_window_start(tok, gemma, pipe):
    """sana-spec §3.4: which token does the kept window start with? Checked against diffusers' output."""
    N = 16
    chi = "\n".join(CHI_DIFFUSERS)
    chi_ids = tok.encode(chi)
    K = len(chi_ids)
    assert tok.convert_ids_to_tokens(chi_ids[-1]) == "▁"        # "User Prompt: " ends in a lone "▁"
    prompts = ["a cat", "3 red apples"]
    full = tok([chi + p for p in prompts], padding="max_length", max_length=K + N - 2, truncation=True,
               padding_side="right", return_tensors="pt")
    assert full.input_ids[:, :K - 1].eq(torch.tensor(chi_ids[:K - 1])).all()   # the CHI prefix is unchanged
    # With our tokenizer (as with Gemma's vocabulary) "▁" merges with a following letter, so position K - 1
    # is the first prompt token; before a digit it stays a lone "▁", which the window then keeps.
    assert tok.convert_ids_to_tokens(full.input_ids[:, K - 1].tolist()) == ["▁a", "▁"]
    assert tok.convert_ids_to_tokens(full.input_ids[1, K].item()) == "3"
    # diffusers' window position 1 is the hidden state at position K - 1 of the full sequence.
    hidden = gemma(full.input_ids, attention_mask=full.attention_mask)[0]      # (2, K + N - 2, D)
    embeds, mask, _, _ = diffusers_encode(pipe, prompts, CHI_DIFFUSERS, N)
    torch.testing.assert_close(embeds[:, 0], hidden[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(embeds[:, 1:], hidden[:, K - 1:], atol=0, rtol=0)
    n_prompt = [len(tok.encode(p, add_special_tokens=False)) for p in prompts]  # "▁" not counted
    assert mask.sum(1).tolist() == [1 + n_prompt[0], 1 + 1 + n_prompt[1]]
    ours, ours_mask = TextEncoder(gemma, tok, TextConfig(max_length=N)).encode(prompts)
    torch.testing.assert_close(ours, embeds, atol=0, rtol=0)
    assert torch.equal(ours_mask, mask)


def test_num_images_per_prompt_pairs_masks_with_embeddings(tok, gemma, pipe):
    enc = TextEncoder(gemma, tok, TextConfig(max_length=16, chi=None))
    prompts = ["a cat", "a much longer prompt"]
    ours = enc.encode_for_cfg(prompts, num_images_per_prompt=2)
    once = diffusers_encode(pipe, prompts, None, 16)
    twice = diffusers_encode(pipe, prompts, None, 16, n=2)
    torch.testing.assert_close(ours.text, twice[0], atol=ATOL, rtol=0)      # [p0, p0, p1, p1]
    assert torch.equal(ours.text_mask, once[1].repeat_interleave(2, dim=0))
    # diffusers 0.42.1 tiles masks as [m0, m1, m0, m1] (diffusers-interop §4.1 item 7): a known divergence.
    assert torch.equal(twice[1], once[1].repeat(2, 1)) and not torch.equal(twice[1], ours.text_mask)
    single = diffusers_encode(pipe, prompts[:1], None, 16, n=3)               # one prompt: no divergence
    assert_same(enc.encode_for_cfg(prompts[:1], num_images_per_prompt=3), single)


def test_lowercase_false_keeps_case(tok, gemma):
    N = 16
    strip_only = TextEncoder(gemma, tok, TextConfig(max_length=N, chi=None, lowercase=False))
    lower = TextEncoder(gemma, tok, TextConfig(max_length=N, chi=None))
    cased, cased_mask = strip_only.encode(["  A Cat "])
    # Independent reference: the stripped, cased text straight through the tokenizer and Gemma.
    ids = tok(["A Cat"], padding="max_length", max_length=N, padding_side="right", return_tensors="pt")
    torch.testing.assert_close(cased, gemma(**ids)[0], atol=ATOL, rtol=0)
    assert torch.equal(cased_mask, ids.attention_mask)
    assert (cased - lower.encode(["  A Cat "])[0]).abs().max() > 1e-3
    torch.testing.assert_close(strip_only.encode(["a cat"])[0], lower.encode(["A CAT"])[0], atol=0, rtol=0)


def test_nvlabs_preset(tok, gemma, pipe):
    N = 16
    enc = TextEncoder(gemma, tok, dataclasses.replace(TEXT_PRESETS["nvlabs"], max_length=N))
    prompts = ["a cat", "a dog on the grass"]                     # already lower-case and stripped
    out = enc.encode_for_cfg(prompts)
    ref_embeds, ref_mask, neg_embeds, neg_mask = diffusers_encode(pipe, prompts, CHI_NVLABS, N)
    torch.testing.assert_close(out.text, ref_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.null_text, neg_embeds, atol=ATOL, rtol=0)
    assert torch.equal(out.text_mask, ref_mask)
    assert torch.equal(out.null_mask, out.text_mask)             # prompt mask reused (sana-spec §3.6)
    assert not torch.equal(out.null_mask, neg_mask)              # "" alone would keep only <bos>
    diffusers_chi = TextEncoder(gemma, tok, TextConfig(max_length=N)).encode(prompts)[0]
    assert (out.text - diffusers_chi).abs().max() > 0             # the quotes change the embedding


def test_negative_prompt_list_and_batch_size(tok, gemma):
    enc = TextEncoder(gemma, tok, TextConfig(max_length=16))
    one, one_mask = enc.encode_negative("", batch_size=3)
    assert one.shape == (3, 16, gemma.config.hidden_size) and one_mask.sum(1).tolist() == [1, 1, 1]
    rows, _ = enc.encode_negative(["", "ugly"])
    torch.testing.assert_close(rows[0], one[0], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode_negative(["", "ugly"], batch_size=3)


def save_tiny(tmp_path, tok, model):
    te_dir, tok_dir = tmp_path / "text_encoder", tmp_path / "tokenizer"
    model.save_pretrained(te_dir)
    tok.save_pretrained(tok_dir)
    return te_dir, tok_dir


def test_from_pretrained_round_trip(tmp_path, tok, gemma):
    te_dir, tok_dir = save_tiny(tmp_path, tok, gemma)
    cfg = TextConfig(max_length=16)
    loaded = TextEncoder.from_pretrained(te_dir, tok_dir, config=cfg)
    expected = TextEncoder(gemma, tok, cfg).encode(PROMPTS)
    got = loaded.encode(PROMPTS)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    assert torch.equal(got[1], expected[1])
    bf16 = TextEncoder.from_pretrained(te_dir, tok_dir, dtype=torch.bfloat16, config=cfg)
    assert bf16.encode(["a cat"])[0].dtype == torch.bfloat16      # returned in the encoder's dtype


def test_from_pretrained_causal_lm_uses_decoder_stack(tmp_path, tok):
    causal = make_gemma(len(tok), seed=1, causal_lm=True)
    folder = tmp_path / "gemma"
    causal.save_pretrained(folder)
    tok.save_pretrained(folder)                                   # one folder, like a hub Gemma repo
    cfg = TextConfig(max_length=16)
    expected = TextEncoder(causal.model, tok, cfg).encode(["a cat"])[0]
    torch.testing.assert_close(TextEncoder.from_pretrained(folder, config=cfg).encode(["a cat"])[0],
                               expected, atol=0, rtol=0)
    in_memory = TextEncoder(causal, tok, cfg)                      # the LM head is dropped here too
    assert in_memory.model is causal.model
    assert in_memory.encode(["a cat"])[0].shape[-1] == causal.config.hidden_size


def test_from_pretrained_errors_name_the_folder(tmp_path, tok, gemma):
    te_dir, tok_dir = save_tiny(tmp_path, tok, gemma)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextEncoder.from_pretrained(missing, tok_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir.*nowhere"):
        TextEncoder.from_pretrained(te_dir, missing)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir.*text_encoder"):
        TextEncoder.from_pretrained(te_dir)                       # model folder without tokenizer files
    weights = te_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])                   # truncated download
    with pytest.raises(OSError, match="text_encoder_dir.*text_encoder") as err:
        TextEncoder.from_pretrained(te_dir, tok_dir)
    assert err.value.__cause__ is not None
    with pytest.raises(OSError, match="text_encoder_dir.*tokenizer"):
        TextEncoder.from_pretrained(tok_dir, tok_dir)             # no config.json: not a model folder


def test_bad_inputs(tok, gemma):
    enc = TextEncoder(gemma, tok, TextConfig(max_length=16, chi=None))
    with pytest.raises(ValueError, match="prompts"):
        enc.encode([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        enc.encode(["a cat", 3])
    with pytest.raises(TypeError, match="prompts"):
        enc.encode(None)
    with pytest.raises(ValueError, match="negative_prompt"):
        enc.encode_for_cfg(["a cat"], negative_prompt=[])
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        enc.encode_for_cfg(["a cat"], num_images_per_prompt=0)
    with pytest.raises(ValueError, match="max_length"):
        TextConfig(max_length=0)
    with pytest.raises(ValueError, match="tokenizer"):
        TextEncoder(make_gemma(8), tok)                           # diffusers' test vocab_size=8 is too small
    with pytest.raises(TypeError, match="chi"):
        TextConfig(chi="User Prompt: ")
    assert TextConfig(chi=[]).chi is None and TextConfig(chi=list(CHI_NVLABS)).chi == CHI_NVLABS
