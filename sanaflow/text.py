"""Text encoder: Gemma-2 hidden states as SANA's caption embedding (arXiv 2410.10629 §2.3; sana-spec §3).
Gemma-2 folders load through sanaflow.gemma (no transformers import); other decoder-only LMs through transformers.

    prompt -> lower().strip() -> CHI + prompt -> tokens (BOS, right padding, truncated to L = K + N - 2)
           -> decoder-only LM -> last hidden state (B, L, D) -> keep [BOS] + last N - 1 positions -> (B, N, D)
    negative / null prompt -> lower().strip() -> tokens (N, no CHI) -> last hidden state (B, N, D), no selection

N = `TextConfig.max_length` (300), K = number of tokens of the CHI alone (BOS included), D = 2304 for
Gemma-2-2B. Defaults reproduce diffusers' `SanaPipeline.encode_prompt` (diffusers-interop §4.1) so that
official diffusers checkpoints see the inputs they were converted with; the NVlabs/Sana behaviour (no
lower-casing, double-quoted CHI, conditional mask reused for the null branch) is `TEXT_PRESETS["nvlabs"]`.
The model is frozen: embeddings are computed under `torch.no_grad()` and returned in the model's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# Complex Human Instruction (sana-spec §3.3): model-input data, so the strings are stored verbatim, never
# paraphrased; changing one character changes every embedding. Source: the default of the
# `complex_human_instruction` argument of `SanaPipeline.__call__` in diffusers 0.42.1
# (src/diffusers/pipelines/sana/pipeline_sana.py). Lines are joined with "\n"; the last line ends in a space,
# and the (preprocessed) user prompt is appended directly after it.
CHI_DIFFUSERS: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)

# The NVlabs/Sana training and inference text (configs/sana_config/1024ms/Sana_1600M_img1024.yaml,
# `text_encoder.chi_prompt`, identical in all SANA-1.0 YAMLs). It differs from diffusers' only in the first
# line, which quotes "Enhanced prompt" with double instead of single quotes (sana-spec §3.3).
CHI_NVLABS: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:',
) + CHI_DIFFUSERS[1:]


@dataclass(frozen=True)
class TextConfig:
    max_length: int = 300                          # N: text tokens the DiT sees (sana-spec §3.4)
    chi: tuple[str, ...] | None = CHI_DIFFUSERS    # instruction lines, joined with "\n"; None or () = no CHI
    lowercase: bool = True                         # diffusers lower-cases prompts; NVlabs only strips (§3.2)
    negative_uses_prompt_mask: bool = False        # NVlabs: the null branch reuses the prompt's mask (§3.6)

    def __post_init__(self):
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"TextConfig: max_length={self.max_length!r} must be a positive int")
        if isinstance(self.chi, str):
            # A bare string would be joined character by character, silently.
            raise TypeError("TextConfig: chi must be a tuple of lines, not a str; wrap it: chi=(text,)")
        if self.chi is not None:
            chi = tuple(self.chi)                  # accept a list, store a hashable tuple
            bad = [i for i, line in enumerate(chi) if not isinstance(line, str)]
            if bad:
                raise TypeError(f"TextConfig: chi[{bad[0]}]={chi[bad[0]]!r} must be a str")
            # diffusers treats an empty list like None (`if not complex_human_instruction`).
            object.__setattr__(self, "chi", chi or None)


# Files that make a folder a tokenizer folder: the tokenizers JSON or a SentencePiece model (older hub repos).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

TEXT_PRESETS = {
    "diffusers": TextConfig(),
    "nvlabs": TextConfig(chi=CHI_NVLABS, lowercase=False, negative_uses_prompt_mask=True),
}


@dataclass(frozen=True)
class TextConditioning:
    """Everything CFG needs, row-aligned: row i of each tensor belongs to image i."""
    text: Tensor         # (B, N, D) prompt embeddings, in the encoder's dtype
    text_mask: Tensor    # (B, N) int64, 1 = real token
    null_text: Tensor    # (B, N, D) negative / null embeddings
    null_mask: Tensor    # (B, N) int64; the prompt's mask if TextConfig.negative_uses_prompt_mask


def _as_prompt_list(prompts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{name}: expected a str or a sequence of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name}: empty; pass at least one prompt (use \"\" for the null prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}]={p!r}: expected str, got {type(p).__name__}")
    return list(prompts)


class TextEncoder:
    """A frozen decoder-only LM (Gemma-2 for SANA) and its tokenizer, turned into caption embeddings.

    `model` is a decoder whose output [0] is the last hidden state (transformers' `Gemma2Model`, or
    `sanaflow.gemma.Gemma2Decoder`, which computes the same without importing transformers); a causal LM (e.g.
    `Gemma2ForCausalLM`) is replaced by its decoder stack, as NVlabs/Sana does with `get_decoder()` (sana-spec
    §3.1). The tokenizer must add BOS: position 0 is always kept (§3.4).
    """

    def __init__(self, model: nn.Module, tokenizer, config: TextConfig = TextConfig()):
        get_head = getattr(model, "get_output_embeddings", None)
        if get_head is not None and get_head() is not None:
            model = model.get_decoder()            # a causal LM's output [0] would be logits, not features
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embedding is not None and len(tokenizer) > embedding.num_embeddings:
            raise ValueError(f"tokenizer: {len(tokenizer)} tokens but the model embeds only "
                             f"{embedding.num_embeddings}; they do not belong together")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: has no pad token; SANA pads every prompt to a fixed length")
        self.model = model.eval()                  # frozen encoder (sana-spec §3.1): no dropout
        self.tokenizer = tokenizer
        self.config = config
        self.chi_text = "\n".join(config.chi) if config.chi else None
        # K counts BOS and the CHI's trailing "▁"; both are part of diffusers' "magic number 2" (§3.4).
        self.chi_tokens = len(tokenizer.encode(self.chi_text)) if self.chi_text is not None else 0

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path | None = None,     # default: the model folder (hub Gemma repos hold both)
        dtype: torch.dtype = torch.float32,          # diffusers' default; NVlabs runs Gemma in bf16
        device: str | torch.device = "cpu",
        config: TextConfig = TextConfig(),
        variant: str | None = None,                  # weights named model.<variant>.safetensors, e.g. "bf16"
    ) -> TextEncoder:
        """Load from local folders only (e.g. a diffusers pipeline's `text_encoder/` and `tokenizer/`).

        Gemma-2 folders load without importing transformers (sanaflow.gemma: the same ops, ~3 s less start-up on
        a 2-core machine); other models, and tokenizers sanaflow.gemma cannot read exactly, through transformers."""
        text_encoder_dir = Path(text_encoder_dir)
        tokenizer_dir = text_encoder_dir if tokenizer_dir is None else Path(tokenizer_dir)
        for name, folder in (("text_encoder_dir", text_encoder_dir), ("tokenizer_dir", tokenizer_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{name}='{folder}': no such folder")
        try:
            model = _load_model(text_encoder_dir, dtype, variant)
        except Exception as e:    # transformers and safetensors raise OSError, ValueError, SafetensorError...
            raise OSError(f"text_encoder_dir='{text_encoder_dir}': cannot load a text encoder "
                          f"({type(e).__name__}: {e})") from e
        # Without tokenizer files, AutoTokenizer falls back on config.json's model type and silently builds
        # an empty 5-token GemmaTokenizer (transformers 5.23); refuse instead.
        if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer_dir='{tokenizer_dir}': no tokenizer files (one of "
                                    f"{', '.join(TOKENIZER_FILES)})")
        try:
            tokenizer = _load_tokenizer(tokenizer_dir)
        except Exception as e:
            raise OSError(f"tokenizer_dir='{tokenizer_dir}': cannot load a tokenizer "
                          f"({type(e).__name__}: {e})") from e
        return cls(model.to(device).requires_grad_(False), tokenizer, config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _preprocess(self, prompts: list[str]) -> list[str]:
        # diffusers: `lower().strip()` (clean_caption=False); NVlabs inference: `strip()` (sana-spec §3.2).
        return [p.lower().strip() if self.config.lowercase else p.strip() for p in prompts]

    # no_grad, not inference_mode: inference tensors cannot be saved for backward, and training feeds
    # these embeddings into the DiT's caption projection.
    @torch.no_grad()
    def _hidden_states(self, texts: list[str], length: int, longest: bool = False) -> tuple[Tensor, Tensor]:
        tokens = self.tokenizer(texts, padding="longest" if longest else "max_length", max_length=length,
                                truncation=True, add_special_tokens=True, padding_side="right", return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)  # (B, length)
        # Right padding under a causal model: pads never change the real tokens' states (sana-spec §3.5).
        hidden = self.model(ids, attention_mask=mask, use_cache=False)[0]     # (B, length, D)
        return hidden.to(self.dtype), mask.long()

    def encode(self, prompts: str | Sequence[str], pad_to_longest: bool = False) -> tuple[Tensor, Tensor]:
        """Prompt embeddings (CHI in context if configured): (B, N, D) in the model's dtype, (B, N) int64.

        pad_to_longest (no CHI only): pad to the batch's longest prompt, n <= N tokens, instead of N. The real
        tokens' states are the same either way (right padding under a causal model, sana-spec §3.5), and the
        padding is masked downstream, so this only saves the work on padding (e.g. when caching embeddings)."""
        texts = self._preprocess(_as_prompt_list(prompts, "prompts"))
        N = self.config.max_length
        if self.chi_text is None:
            return self._hidden_states(texts, N, longest=pad_to_longest)    # (B, N or n, D), (B, N or n)
        if pad_to_longest:
            raise ValueError("pad_to_longest: only without the complex human instruction (its window is N tokens)")
        # The CHI keeps its case; only the user prompt is preprocessed (diffusers-interop §4.1 item 3).
        L = self.chi_tokens + N - 2
        hidden, mask = self._hidden_states([self.chi_text + t for t in texts], L)   # (B, L, D), (B, L)
        # Keep BOS and the last N - 1 positions (sana-spec §3.4). The CHI's trailing "▁" sits at position
        # K - 1; when it merges with the first prompt word ("▁a" with Gemma) the window starts at the prompt,
        # else it starts with the lone "▁". Either way this is exactly diffusers' `[0] + range(-N + 1, 0)`.
        keep = torch.tensor([0, *range(L - N + 1, L)], device=hidden.device)   # (N,)
        return hidden[:, keep], mask[:, keep]                               # (B, N, D), (B, N)

    def encode_negative(self, prompts: str | Sequence[str] = "", batch_size: int | None = None
                        ) -> tuple[Tensor, Tensor]:
        """Negative / null embeddings: no CHI, no selection, exactly N tokens (sana-spec §3.6).

        A single string is encoded once and repeated `batch_size` times (default 1); a sequence gives one row
        per entry. Returns ((B, N, D), (B, N) int64), each row with its own mask (diffusers).
        """
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
        texts = self._preprocess(_as_prompt_list(prompts, "negative_prompt"))
        if not isinstance(prompts, str) and batch_size is not None and batch_size != len(texts):
            raise ValueError(f"negative_prompt: {len(texts)} prompts but batch_size={batch_size}")
        embeds, mask = self._hidden_states(texts, self.config.max_length)   # (b, N, D), (b, N)
        if isinstance(prompts, str) and batch_size is not None:
            embeds, mask = embeds.repeat(batch_size, 1, 1), mask.repeat(batch_size, 1)   # (B, N, D), (B, N)
        return embeds, mask

    def encode_for_cfg(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                       num_images_per_prompt: int = 1) -> TextConditioning:
        """Prompt and null branches for classifier-free guidance, `len(prompts) * num_images_per_prompt` rows.

        Rows are ordered [p0, p0, ..., p1, p1, ...] for embeddings and masks alike. (diffusers 0.42.1
        `encode_prompt` repeats embeddings that way but tiles masks as [m0, m1, ..., m0, m1, ...], which
        mis-pairs them when there are several prompts and several images per prompt; diffusers-interop §4.1
        item 7. We do not reproduce that.)
        """
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}: must be a positive int")
        text, text_mask = self.encode(prompts)                              # (B, N, D), (B, N)
        null_text, null_mask = self.encode_negative(negative_prompt, batch_size=len(text))   # (B, N, D), (B, N)
        if self.config.negative_uses_prompt_mask:
            # NVlabs: SanaMS.forward repeats the conditional mask over the whole CFG batch (sana-spec §3.6).
            null_mask = text_mask.clone()
        n = num_images_per_prompt
        text, text_mask, null_text, null_mask = (
            t.repeat_interleave(n, dim=0) for t in (text, text_mask, null_text, null_mask))   # (B * n, ...)
        return TextConditioning(text, text_mask, null_text, null_mask)


def _load_model(folder: Path, dtype: torch.dtype, variant: str | None) -> nn.Module:
    from .hub import read_json
    if read_json(folder / "config.json").get("model_type") == "gemma2":
        from .gemma import load_gemma2
        return load_gemma2(folder, dtype, variant)
    from transformers import AutoModel   # lazy: importing sanaflow.text stays light
    # AutoModel maps a `*ForCausalLM` checkpoint to its base model and drops the LM head, which is the decoder
    # stack SANA uses (sana-spec §3.1).
    return AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype, variant=variant)


def _load_tokenizer(folder: Path):
    from .gemma import JsonTokenizer, TokenizerNotReproducible
    try:
        return JsonTokenizer.from_folder(folder)
    except TokenizerNotReproducible:     # e.g. only a SentencePiece tokenizer.model: transformers converts it
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def simple_tokenizer(words: Sequence[str] = ()):
    """A small Gemma-style BPE tokenizer built offline: "▁" for spaces, <bos> first, byte fallback for anything
    else, "▁" merged with a following letter (as SentencePiece vocabularies do, so the CHI's trailing space joins
    the first prompt word, sana-spec §3.4), and each of `words` as one token. For random pipelines and tests;
    real models ship their own tokenizer folder. Ids: <pad>=0, <eos>=1, <bos>=2 as Gemma2Config assumes."""
    import string
    from transformers import GemmaTokenizer

    vocab = {tok: i for i, tok in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    for b in range(256):                                  # byte fallback: every string is encodable
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *string.ascii_letters, *string.digits, *".,:;!?'\"-()"]:
        vocab[piece] = len(vocab)
    merges = []
    for c in string.ascii_letters:                        # "▁" + letter -> "▁c"
        vocab["▁" + c] = len(vocab)
        merges.append(("▁", c))
    # Whole words as left-to-right chains ("▁c"+"a" -> "▁ca", "▁ca"+"t" -> "▁cat") after a space and, if
    # capitalised, at the start of a line. Every left element starts with "▁" or a capital, so chains do not
    # interfere and a listed word after a space always becomes one token.
    for word in sorted(set(words)):
        for start in ("▁" + word[0], word[0]) if word[0].isupper() else ("▁" + word[0],):
            piece = start
            for c in word[1:]:
                if piece + c not in vocab:
                    vocab[piece + c] = len(vocab)
                    merges.append((piece, c))
                piece += c
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)   # no <bos> without the flag
