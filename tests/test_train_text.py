"""Text encoder training (sanaflow/train_text.py): a tiny Gemma-2 and its BPE tokenizer trained on shapes captions.

One short run (module fixture) is shared: it must lower the next-token loss from the uniform-vocabulary value
ln V to a fraction of it, and its export must load with TextEncoder.from_pretrained and reproduce the trained
model's hidden states.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer

from sanaflow import data, shapes
from sanaflow.text import CHI_DIFFUSERS, TextConfig, TextEncoder
from sanaflow.train import DataError, DistEnv, TrainConfig, train
from sanaflow.train_text import TextTask, next_token_nll, padded

ONE_THREAD = True                           # tests/conftest.py: tiny models, one torch thread

STEPS = 100


def text_config(data_dir, **changes) -> TrainConfig:
    fields = {"task": "text", "data": str(data_dir), "model": "tiny", "options": {}, "steps": STEPS,
              "batch_size": 16, "lr": 3e-3, "grad_clip": 1.0, "log_every": 1}
    return TrainConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    data.write_wds(shapes.samples(200, 32), folder, shard_size=100)   # 200 scenes, ~950 captions, 2 shards
    return folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    summary = train(text_config(data_dir), run, DistEnv(), progress=False)
    return run, summary


def unseen_captions(n: int = 20) -> list[str]:
    # Scenes 1000.. are not among the 200 training scenes.
    return [c["text"].lower().strip() for _, meta in shapes.samples(n, 32, start=1000) for c in meta["captions"]]


def test_short_run_lowers_the_next_token_loss(trained):
    run, _ = trained
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    start = log[0]
    assert start["event"] == "start" and start["reader"] == "WdsReader" and start["samples"] == 200
    vocab = start["vocab_size"]
    losses = [r["loss"] for r in log[1:]]
    assert len(losses) == STEPS
    # An untrained LM with small logits predicts nearly uniformly: its cross-entropy is ln V (closed form).
    assert abs(losses[0] - math.log(vocab)) < 0.3, (losses[0], math.log(vocab))
    late = sum(losses[-10:]) / 10
    assert late < 0.4 * math.log(vocab), (losses[:3], losses[-10:])
    metrics = json.loads((run / "text_metrics.json").read_text())
    assert metrics["vocab_size"] == metrics["uniform_perplexity"] == vocab
    assert metrics["heldout_captions"] == start["heldout_captions"] > 0
    assert metrics["heldout_perplexity"] == pytest.approx(math.exp(metrics["heldout_loss"]), rel=1e-5)
    # Held-out scenes: 20x below uniform means the LM learned the caption language, not just the training set.
    assert metrics["heldout_perplexity"] < vocab / 20, metrics


def test_export_loads_as_a_text_encoder(trained):
    run, summary = trained
    folder = run / "model"
    enc = TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer",
                                      config=TextConfig(chi=None, max_length=16))
    prompts = ["a red circle", "two blue squares to the left of a yellow star"]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (2, 16, 64) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    lengths = [len(enc.tokenizer(p).input_ids) for p in prompts]     # <bos> + tokens, right padding
    assert mask.tolist() == [[1] * n + [0] * (16 - n) for n in lengths]
    # The export holds the trained weights: its hidden states are the trained decoder's (same ops, same order).
    lm = summary["model"].eval()
    ids = enc.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = lm.model(ids.input_ids, attention_mask=ids.attention_mask)[0]
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
    # With the complex human instruction in context the window still starts at the prompt (sana-spec §3.4).
    emb, mask = TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer",
                                            config=TextConfig(max_length=16)).encode(prompts)
    assert emb.shape == (2, 16, 64) and mask.tolist() == [[1] * n + [0] * (16 - n) for n in lengths]


def test_tokenizer_round_trips_captions_and_adds_bos(trained):
    run, _ = trained
    tok = AutoTokenizer.from_pretrained(run / "model" / "tokenizer")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)   # Gemma2Config's defaults
    for text in unseen_captions() + ["Upper Case, digits 123 and ünïcode ✓"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:] and tok.eos_token_id not in ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # BPE learned the caption words: a common caption is a few tokens, not one per character.
    assert len(tok("a red circle to the left of a blue square").input_ids) <= 1 + 10
    # The CHI's trailing space merges with the first prompt word, so TextEncoder's window [BOS] + last N - 1
    # starts exactly at the prompt (sana-spec §3.4).
    chi, prompt = "\n".join(CHI_DIFFUSERS), "a red circle"
    assert tok(chi + prompt).input_ids == tok(chi).input_ids[:-1] + tok(" " + prompt).input_ids[1:]


def test_padding_does_not_change_the_loss(trained):
    _, summary = trained
    lm = summary["model"].eval()
    tok_ids = [torch.tensor([[2, 5 + i, 9, 17, 1][: 3 + i]]) for i in range(3)]     # lengths 3, 4, 5
    lengths = torch.tensor([t.shape[1] for t in tok_ids])
    ids = torch.zeros(3, 5, dtype=torch.int32)
    for i, t in enumerate(tok_ids):
        ids[i, : t.shape[1]] = t
    with torch.no_grad():
        nll, count = next_token_nll(lm, *padded(ids, lengths))
        alone = [next_token_nll(lm, t, torch.ones_like(t)) for t in tok_ids]    # each caption unpadded
    assert count == sum(int(c) for _, c in alone) == 2 + 3 + 4
    torch.testing.assert_close(nll, sum(n for n, _ in alone), rtol=1e-5, atol=1e-5)


def test_two_ranks_see_and_average_to_what_one_process_sees(data_dir, tmp_path):
    task = TextTask(text_config(data_dir), tmp_path, DistEnv())
    task.prepare()
    torch.manual_seed(0)
    lm = task.build_model()
    whole = task.batch(7, torch.Generator())
    with torch.no_grad():
        whole_loss = task.loss(lm, whole)
        parts, losses = [], []
        for rank in range(2):
            task.env = DistEnv(rank=rank, world=2)     # after prepare: its barrier would need a process group
            parts.append(task.batch(7, torch.Generator()))
            losses.append(task.loss(lm, parts[-1]))
    for key in ("ids", "mask"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    assert whole["ids"].shape[0] == 16 and (whole["ids"][:, 0] == 2).all()    # every sequence starts with <bos>
    # DDP averages the ranks' losses (and gradients): that average must be the one-process token mean.
    torch.testing.assert_close(sum(losses) / 2, whole_loss, rtol=1e-6, atol=0)
    nll, count = next_token_nll(lm, whole["ids"], whole["mask"])
    torch.testing.assert_close(whole_loss, nll / count)


def test_paired_sequences_are_two_different_captions_of_one_sample(data_dir, tmp_path):
    """options.pair_captions: `<bos> A <eos> B <eos>`, A and B two distinct captions of the same sample, drawn
    from the step's generator (same generator state, same batch); the two ranks split it as for single captions."""
    task = TextTask(text_config(data_dir, options={"pair_captions": True, "max_tokens": 128}), tmp_path, DistEnv())
    task.prepare()
    tok = task.tokenizer
    samples = [[c["text"].lower().strip() for c in meta["captions"]] for _, meta in shapes.samples(200, 32)]
    fit = samples[:len(samples) - max(1, round(0.05 * len(samples)))]
    owners: dict[str, set[int]] = {}                      # short captions ("three circles") recur across scenes
    for i, caps in enumerate(fit):
        for c in caps:
            owners.setdefault(c, set()).add(i)
    batch = task.batch(3, torch.Generator().manual_seed(1))
    again = task.batch(3, torch.Generator().manual_seed(1))
    assert torch.equal(batch["ids"], again["ids"])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    seen_two = 0
    for ids, mask in zip(batch["ids"], batch["mask"]):
        row = ids[mask.bool()].tolist()
        assert row[0] == bos and row[-1] == eos and bos not in row[1:] and row.count(eos) == 2
        cut = row.index(eos)
        a, b = tok.decode(row[1:cut]), tok.decode(row[cut + 1:-1])
        assert owners[a] & owners[b]                      # captions of one scene
        if a != b:
            seen_two += 1
    assert seen_two == len(batch["ids"])                  # every shapes scene has several distinct captions
    parts = []
    for rank in range(2):
        task.env = DistEnv(rank=rank, world=2)
        parts.append(task.batch(3, torch.Generator().manual_seed(1)))
    assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])


def test_rerun_reuses_the_tokenizer_and_refuses_a_different_recipe(data_dir, tmp_path):
    TextTask(text_config(data_dir), tmp_path, DistEnv()).prepare()
    first = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    TextTask(text_config(data_dir), tmp_path, DistEnv()).prepare()
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == first
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer"))):
        TextTask(text_config(data_dir, options={"vocab_size": 300}), tmp_path, DistEnv()).prepare()


def test_resume_is_exact_with_the_tied_embedding(data_dir, tmp_path):
    """Gemma-2 ties lm_head to the embedding; checkpoints must store and restore it so that 3 + 3 steps == 6."""
    from safetensors.torch import load_file
    from sanaflow import checkpoint
    cfg = text_config(data_dir, steps=6)
    train(cfg, tmp_path / "whole", DistEnv(), progress=False)
    train(cfg.replace(steps=3), tmp_path / "pieces", DistEnv(), progress=False)
    model = train(cfg, tmp_path / "pieces", DistEnv(), progress=False)["model"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # still tied
    a, b = (load_file(checkpoint.latest(tmp_path / r) / "model.safetensors") for r in ("whole", "pieces"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reads_sample_folders_and_lower_cases_txt_captions(tmp_path):
    folder = tmp_path / "data"
    data.write_folder(shapes.samples(20, 32), folder)                   # {key}.png + {key}.json
    (folder / "zz_user.png").write_bytes(data.encode_png(shapes.sample(0, 32)[0]))
    (folder / "zz_user.txt").write_text("  A Red CIRCLE \nBlue square\n")   # one caption per line
    task = TextTask(text_config(folder), tmp_path / "run", DistEnv())
    info = task.prepare()
    assert info["reader"] == "ImageFolderReader" and info["samples"] == 21
    # The held-out fraction is the last sample in reader order: the user's image, with TextEncoder's preprocessing.
    held = [task.tokenizer.decode(ids[1:n - 1]) for ids, n in zip(task.held_ids.tolist(), task.held_lengths)]
    assert held == ["a red circle", "blue square"]
    assert info["train_captions"] == sum(len(shapes.sample(i, 32)[1]["captions"]) for i in range(20))


@pytest.mark.parametrize("case", ["missing", "empty", "too_small"])
def test_unusable_data_raises_before_any_training_work(case, tmp_path):
    folder = tmp_path / "data"
    if case != "missing":
        folder.mkdir()
    if case == "too_small":
        data.write_wds(shapes.samples(3, 32), folder)      # ~12 captions, fewer than batch_size=16
    run = tmp_path / "run"
    with pytest.raises(DataError, match=re.escape(str(folder))):
        train(text_config(folder), run, DistEnv(), progress=False)
    assert not (run / "tokenizer").exists() and not (run / "checkpoints").exists()
    assert not (run / "log.jsonl").exists()


def test_bad_model_and_options_name_the_field(data_dir, tmp_path):
    with pytest.raises(ValueError, match="huge"):
        TextTask(text_config(data_dir, model="huge"), tmp_path, DistEnv())
    with pytest.raises(ValueError, match="num_layers"):
        TextTask(text_config(data_dir, model={"preset": "tiny", "num_layers": 3}), tmp_path, DistEnv())
    with pytest.raises(ValueError, match="vocab_size"):
        text_config(data_dir, options={"vocab_size": 100})
    with pytest.raises(ValueError, match="holdout"):
        text_config(data_dir, options={"holdout": 0})


def test_a_text_corpus_teaches_words_the_captions_never_use(data_dir, tmp_path):
    """options.corpus: held-out captions as text only. Its words ("disc", never in a training caption) enter the
    tokenizer and the LM, while the held-out loss stays on `data`'s own captions."""
    corpus = tmp_path / "corpus"
    data.write_wds(shapes.samples(200, 32, held_out=True), corpus, shard_size=100)
    assert any(" disc" in c["text"] for _, m in shapes.samples(200, 32, held_out=True) for c in m["captions"])
    plain = TextTask(text_config(data_dir), tmp_path / "plain", DistEnv())
    plain_info = plain.prepare()
    task = TextTask(text_config(data_dir, options={"corpus": str(corpus)}), tmp_path / "run", DistEnv())
    info = task.prepare()
    assert info["samples"] == plain_info["samples"] == 200 and info["corpus_samples"] == 200
    assert info["train_captions"] > plain_info["train_captions"]
    assert info["heldout_captions"] == plain_info["heldout_captions"]

    def held(t):                                                     # token ids differ, the texts do not
        return [t.tokenizer.decode(ids[1:n - 1]) for ids, n in zip(t.held_ids.tolist(), t.held_lengths)]
    assert held(task) == held(plain)
    assert len(plain.tokenizer.tokenize(" disc")) > 1                # a word the plain tokenizer never met
    assert task.tokenizer.tokenize(" disc") == ["Ġdisc"]             # learned from the corpus

    with pytest.raises(DataError, match="nowhere"):
        TextTask(text_config(data_dir, options={"corpus": str(tmp_path / "nowhere")}), tmp_path / "r2",
                 DistEnv()).prepare()
