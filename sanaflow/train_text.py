"""Text encoder training: SANA's frozen decoder-only LLM (sana-spec §3.1), in miniature.

    captions of the data set -> lower().strip() as at inference (§3.2) -> byte-level BPE tokenizer trained on them
      -> Gemma2ForCausalLM (transformers) trained on next-token prediction -> frozen, exported as
    model/text_encoder/ + model/tokenizer/, which `sanaflow.text.TextEncoder.from_pretrained` loads.

Every caption of a training sample is one sequence `<bos> caption <eos>`: <bos> because TextEncoder always keeps
position 0 (§3.4), <eos> so that the LM learns where captions stop. The last `holdout` fraction of samples (reader
order) is kept out of the tokenizer and the LM; `run/text_metrics.json` reports the next-token loss on it.

`options.corpus` adds a second data set whose captions only the text encoder reads: the stand-in for an LLM's
pretraining text. SANA's Gemma-2 knows "disc" and "plus sign" from the web; an encoder trained on the DiT's
captions alone has never seen the held-out split's words (shapes.HELD_OUT_SHAPE_WORDS), so no DiT could follow a
prompt that uses them. With the held-out split's captions as corpus (text only: the DiT and the AE never see its
scenes), the encoder learns those words from their contexts, as an LLM does (docs/bundled-model.md, tenth round).

`options.pair_captions` makes each sequence two captions of one sample, `<bos> A <eos> B <eos>`: predicting B,
another phrasing in another word order, needs the scene A describes. Without a corpus, benchmarks/text_binding.py
found A's hidden states (what the DiT reads) no more telling of which colour and place belong to which shape
(docs/bundled-model.md, sixth round). With the corpus it is what ties a word the captions never use to its shape:
a shape probe fitted on training words scored 0.000 on "disc"/"plus sign" from single captions, 1.000 from pairs
(tenth round). shapes-text uses both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data
from .files import write_json_atomic
from .hub import write_folder_atomic
from .text import TextConfig
from .train import BatchOrder, DataError, DistEnv, TrainConfig, open_dataset

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")   # ids 0, 1, 2, 3: Gemma2Config's pad/eos/bos defaults

# Gemma2Config fields. Gemma-2-2B is hidden 2304, 26 layers, 8 heads (4 key/value) of 256, MLP 4x (§3.1);
# "small" is as wide as the small DiT's caption_channels (sanaflow.dit.DIT_PRESETS["small"]).
TEXT_MODEL_PRESETS = {
    "tiny":  {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32},
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64},
}


def model_fields(model) -> dict:
    """TrainConfig.model (a preset name, or a dict of Gemma2Config fields with an optional "preset" base)."""
    from transformers import Gemma2Config
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict):
        raise TypeError(f"TrainConfig.model={model!r}: a preset name or a dict of Gemma2Config fields")
    fields = dict(model)
    preset = fields.pop("preset", None)
    if preset is not None and preset not in TEXT_MODEL_PRESETS:
        raise ValueError(f"TrainConfig.model: preset {preset!r} is not one of {sorted(TEXT_MODEL_PRESETS)}")
    if "vocab_size" in fields:
        raise ValueError("TrainConfig.model: vocab_size is not settable; it is the trained tokenizer's size")
    unknown = sorted(set(fields) - set(Gemma2Config().to_dict()))
    if unknown:
        raise ValueError(f"TrainConfig.model: {unknown} are not Gemma2Config fields")
    fields = {**TEXT_MODEL_PRESETS.get(preset, {}), **fields}
    # The LM head stays tied to the embedding, as in Gemma-2 (checkpoint.save copies tied tensors apart).
    # Gemma-2 scales queries by query_pre_attn_scalar**-0.5, 256 = the head size of Gemma-2-2B; follow head_dim.
    fields.setdefault("query_pre_attn_scalar", fields.get("head_dim", 256))
    return fields


def read_captions(path: Path, lowercase: bool) -> tuple[list[list[str]], str, dict]:
    """Each sample's caption texts in reader order, the reader used, and its skip counts."""
    reader = open_dataset(path)          # DataError if missing; the readers decode every image, unavoidably
    samples, uncaptioned = [], 0
    for sample in reader:
        try:
            texts = [c["text"] for c in data.captions_from_json(sample.meta)]
        except data.CaptionError:
            texts = []
        # The text encoder's preprocessing at inference (TextEncoder._preprocess, sana-spec §3.2).
        texts = [t for t in (t.lower().strip() if lowercase else t.strip() for t in texts) if t]
        if texts:
            samples.append(texts)
        else:
            uncaptioned += 1
    return samples, type(reader).__name__, {**reader.skipped, **({"no_caption": uncaptioned} if uncaptioned else {})}


def train_tokenizer(captions: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of the captions (every string encodes: no <unk> in practice) that adds <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # No prefix space: decode(encode(x)) == x. The space before a word belongs to it ("Ġred"), so the CHI's
    # trailing space merges with the first prompt word, as Gemma's "▁" does (sana-spec §3.4).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")


def tokenize(tokenizer, captions: list[str], max_tokens: int) -> tuple[Tensor, Tensor, int]:
    """(n, max_tokens) int32 ids `<bos> caption <eos> <pad>...`, (n,) lengths, and how many captions were cut."""
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(captions).input_ids]   # <bos> from the tokenizer
    ids = torch.full((len(rows), max_tokens), tokenizer.pad_token_id, dtype=torch.int32)
    for i, row in enumerate(rows):
        ids[i, :min(len(row), max_tokens)] = torch.tensor(row[:max_tokens])   # right truncation, as at inference
    lengths = torch.tensor([min(len(row), max_tokens) for row in rows])
    return ids, lengths, sum(len(row) > max_tokens for row in rows)


def padded(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Rows cut to the longest length among them: (B, L) int64 ids and attention mask (1 = real token)."""
    L = int(lengths.max())
    return ids[:, :L].long(), (torch.arange(L) < lengths[:, None]).long()


def next_token_nll(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of token i+1 given tokens <= i over real (unpadded) targets, and their count."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]   # (B, L-1, V)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                            # (B, L-1), last = <eos>
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll, (targets != -100).sum()


class TextTask:
    """The train.Task of the text encoder: captions -> tokenizer -> next-token prediction -> TextEncoder folders."""

    @dataclass(frozen=True)
    class Options:
        vocab_size: int = 1024     # BPE target incl. 4 special and 256 byte tokens; smaller if merges run out
        max_tokens: int = 64       # training length incl. <bos> and <eos>; longer captions are cut (and counted)
        holdout: float = 0.05      # last fraction of samples kept out of training, for text_metrics.json
        lowercase: bool = TextConfig().lowercase   # must match the TextConfig the encoder is used with (§3.2)
        pair_captions: bool = False   # sequences of two captions of one sample, `<bos> A <eos> B <eos>` (see above)
        corpus: str = ""           # a data folder whose captions join the training text (see above); "" = none

        def __post_init__(self):
            for name in ("vocab_size", "max_tokens"):
                if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                    raise TypeError(f"options.{name}={getattr(self, name)!r}: must be an int")
            if self.vocab_size <= 256 + len(SPECIAL_TOKENS):
                raise ValueError(f"options.vocab_size={self.vocab_size}: must exceed {256 + len(SPECIAL_TOKENS)} "
                                 f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
            if self.max_tokens < 3:
                raise ValueError(f"options.max_tokens={self.max_tokens}: must be >= 3 (<bos>, a token, <eos>)")
            if not 0 < self.holdout < 1:
                raise ValueError(f"options.holdout={self.holdout}: must be in (0, 1)")

    def __init__(self, cfg: TrainConfig, run: Path, env: DistEnv):
        self.cfg, self.run, self.env, self.opt = cfg, Path(run), env, cfg.options
        self.fields = model_fields(cfg.model)          # validated now, before any data is read

    def prepare(self) -> dict:
        from transformers import AutoTokenizer
        path = Path(self.cfg.data)
        samples, reader, skipped = read_captions(path, self.opt.lowercase)
        n_held = max(1, round(self.opt.holdout * len(samples)))
        extra = read_captions(Path(self.opt.corpus), self.opt.lowercase)[0] if self.opt.corpus else []
        if self.opt.corpus and not extra:
            raise DataError(f"options.corpus={self.opt.corpus!r}: no captions in it")
        # The corpus trains the tokenizer and the LM; the held-out loss stays on `data`'s own captions.
        samples = samples[:len(samples) - n_held] + extra + samples[len(samples) - n_held:]
        n_fit = len(samples) - n_held
        fit = [t for s in samples[:n_fit] for t in s]
        held = [t for s in samples[n_fit:] for t in s]
        if len(fit) < self.cfg.batch_size:
            raise DataError(f"data={str(path)!r}: {len(samples) - len(extra)} samples with captions ({n_held} held "
                            f"out, {len(extra)} more in options.corpus) give "
                            f"{len(fit)} training captions, fewer than batch_size={self.cfg.batch_size}; "
                            f"skipped: {skipped or 'none'}")
        folder, recipe = self.run / "tokenizer", {"vocab_size": self.opt.vocab_size, "lowercase": self.opt.lowercase,
                                                  "train_captions": len(fit)}
        if not folder.is_dir():                          # a resumed run reuses its tokenizer: ids must not move
            def write(tmp: Path) -> None:
                train_tokenizer(fit, self.opt.vocab_size).save_pretrained(str(tmp))
                (tmp / "recipe.json").write_text(json.dumps(recipe))
            self.env.on_main(lambda: write_folder_atomic(folder, write))
        found = json.loads((folder / "recipe.json").read_text()) if (folder / "recipe.json").is_file() else None
        if found != recipe:
            raise ValueError(f"{folder}: a tokenizer trained with {found}, not {recipe}; "
                             f"use another run folder, or delete {folder}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.ids, self.lengths, cut = tokenize(self.tokenizer, fit, self.opt.max_tokens)
        self.held_ids, self.held_lengths, _ = tokenize(self.tokenizer, held, self.opt.max_tokens)
        if self.opt.pair_captions:        # batches of samples; sample i owns captions first[i] .. first[i + 1] - 1
            counts = torch.tensor([len(s) for s in samples[:n_fit]])
            self.first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            self.order = BatchOrder({"text": torch.arange(len(counts))}, self.cfg.batch_size, self.cfg.seed)
        else:
            self.order = BatchOrder({"text": torch.arange(len(fit))}, self.cfg.batch_size, self.cfg.seed)
        return {"reader": reader, "samples": len(samples) - len(extra), "corpus_samples": len(extra),
                "train_captions": len(fit), "heldout_captions": len(held),
                "vocab_size": len(self.tokenizer), "truncated_captions": cut, "skipped": skipped}

    def build_model(self) -> nn.Module:
        from transformers import Gemma2Config, Gemma2ForCausalLM
        tok = self.tokenizer
        # Eager attention: Gemma-2 soft-caps attention logits (50 * tanh(s / 50)), which SDPA cannot do;
        # transformers marks Gemma-2 as not supporting SDPA for that reason.
        config = Gemma2Config(**self.fields, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, attn_implementation="eager")
        return Gemma2ForCausalLM(config)

    def batch(self, step: int, g: torch.Generator) -> dict[str, Tensor]:
        # Single captions: no randomness, every caption is its own sequence and BatchOrder picks them.
        _, idx = self.order(step)
        if self.opt.pair_captions:
            ids, lengths = self.pairs(idx, g)
        else:
            ids, lengths = self.ids[idx], self.lengths[idx]
        ids, mask = padded(ids, lengths)                       # (B, L) each, L = longest in the global batch
        targets = mask[:, 1:].sum()                            # predicted tokens of the whole global batch
        return {"ids": self.env.local(ids).to(self.env.device), "mask": self.env.local(mask).to(self.env.device),
                "targets": targets.to(self.env.device)}

    def pairs(self, samples: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """`<bos> A <eos> B <eos>` for each sample: A uniform among its captions, B uniform among the others
        (A again if it has one caption). -> (B, 2 max_tokens - 1) ids, (B,) lengths."""
        first, n = self.first[samples], self.first[samples + 1] - self.first[samples]          # (B,) each
        a = first + (torch.rand(len(samples), generator=g) * n).long().clamp(max=n - 1)
        other = (torch.rand(len(samples), generator=g) * (n - 1)).long().clamp(max=(n - 2).clamp(min=0))
        b = torch.where(n > 1, first + (a - first + 1 + other) % n, a)       # any caption but A, uniformly
        la, lb = self.lengths[a], self.lengths[b]
        ids = torch.full((len(samples), 2 * self.ids.shape[1] - 1), self.tokenizer.pad_token_id, dtype=self.ids.dtype)
        for i in range(len(samples)):                                        # B without its <bos>
            ids[i, :la[i]] = self.ids[a[i], :la[i]]
            ids[i, la[i]:la[i] + lb[i] - 1] = self.ids[b[i], 1:lb[i]]
        return ids, la + lb - 1

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        # A plain mean over this rank's tokens would make DDP's average a mean of per-rank means, which weighs
        # tokens by how many share their rank. Scaled by world / (global batch's tokens), the ranks' average is
        # the token mean of the global batch: 2 processes train what 1 process trains.
        nll, _ = next_token_nll(model, batch["ids"], batch["mask"])
        return nll * self.env.world / batch["targets"]

    @torch.no_grad()
    def heldout_loss(self, model: nn.Module) -> tuple[float, int]:
        """Token-weighted mean next-token loss on the held-out captions, and the number of target tokens."""
        device = next(model.parameters()).device   # FSDP runs export a fresh CPU copy (train.train)
        total, count = torch.zeros((), device=device), 0
        for start in range(0, len(self.held_ids), self.cfg.batch_size):
            ids, mask = padded(self.held_ids[start:start + self.cfg.batch_size],
                               self.held_lengths[start:start + self.cfg.batch_size])
            nll, n = next_token_nll(model, ids.to(device), mask.to(device))
            total, count = total + nll, count + int(n)
        return (total / count).item(), count

    def export(self, model: nn.Module, folder: Path) -> None:
        model.eval()                          # frozen from here on (sana-spec §3.1); no dropout in the metric
        loss, tokens = self.heldout_loss(model)
        write_json_atomic(self.run / "text_metrics.json", {
            "steps": self.cfg.steps, "heldout_loss": loss, "heldout_perplexity": float(torch.tensor(loss).exp()),
            "heldout_captions": len(self.held_ids), "heldout_tokens": tokens, "vocab_size": len(self.tokenizer),
            "uniform_perplexity": len(self.tokenizer)})   # what a model that learned nothing would score

        def write(tmp: Path) -> None:
            # The whole causal LM (safetensors): AutoModel, which TextEncoder uses, loads its base model from it.
            model.save_pretrained(str(tmp / "text_encoder"))
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_folder_atomic(Path(folder), write)
