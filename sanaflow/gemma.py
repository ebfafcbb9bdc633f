"""Gemma-2 without transformers: the decoder stack whose last hidden state is SANA's caption feature (sana-spec §3.1),
its loader for transformers folders (config.json + safetensors), and a tokenizer over the `tokenizers` library.

Why: importing transformers' Gemma-2 and AutoTokenizer takes about 3 s on a busy 2-core machine (modeling_gemma2
pulls in torch.distributed.tensor, torch._dynamo, ...), most of `sanaflow generate`'s 5 s budget, for a 4M-parameter
encoder. `Gemma2Decoder.forward` runs the operations of transformers 5.23's `Gemma2Model` with eager attention (the
implementation it picks for Gemma-2) in the same order, so on one machine both give the same bits
(tests/test_gemma.py). Only what SANA runs is here: one forward pass, no KV cache, no LM head, default RoPE;
config.json fields that would change the result otherwise are refused by name.

    ids (B, L) -> embed * sqrt(D) -> layers x [x + norm(attn(norm(x))); x + norm(geglu(norm(x)))] -> norm -> (B, L, D)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from .hub import _load_component, write_json

LAYER_TYPES = ("sliding_attention", "full_attention")


def _check_positive(name: str, value, types: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive {'int' if types is int else 'number'}")


@dataclass(frozen=True)
class Gemma2Config:
    """The fields of transformers' Gemma2Config that change Gemma2Model's last hidden state (defaults: Gemma-2-2B)."""
    vocab_size: int = 256000
    hidden_size: int = 2304                       # D
    intermediate_size: int = 9216                 # F, the GeGLU width
    num_hidden_layers: int = 26
    num_attention_heads: int = 8                  # h query heads
    num_key_value_heads: int = 4                  # GQA: each key/value head serves h / kv query heads
    head_dim: int = 256                           # d
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256            # logits are scaled by query_pre_attn_scalar ** -0.5, not d ** -0.5
    attn_logit_softcapping: float | None = 50.0   # logits -> cap * tanh(logits / cap); None: no cap
    sliding_window: int | None = 4096             # keys a sliding layer's query sees, its own included
    layer_types: tuple[str, ...] = ()             # one of LAYER_TYPES per layer; () = Gemma-2's alternation
    attention_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            _check_positive(name, getattr(self, name), int)
        for name in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar"):
            _check_positive(name, getattr(self, name), (int, float))
        if self.attn_logit_softcapping is not None:
            _check_positive("attn_logit_softcapping", self.attn_logit_softcapping, (int, float))
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"attention_bias={self.attention_bias!r}: must be true or false")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        # Gemma-2 alternates local (sliding-window) and global layers, local first (arXiv 2408.00118 §2), which
        # transformers' Gemma2Config fills in when config.json has no layer_types.
        types = tuple(self.layer_types) or tuple(LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", types)
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types: {len(types)} entries for num_hidden_layers={self.num_hidden_layers}")
        for i, kind in enumerate(types):
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}]={kind!r}: must be one of {LAYER_TYPES}")
        if "sliding_attention" in types:
            _check_positive("sliding_window", self.sliding_window, int)

    @classmethod
    def from_transformers(cls, config: dict) -> Gemma2Config:
        """From a transformers config.json; refuses, naming the field, what this module would compute differently."""
        if not isinstance(config, dict) or config.get("model_type") != "gemma2":
            found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"model_type={found!r}: not a Gemma-2 config (expected 'gemma2')")
        act = config.get("hidden_activation", "gelu_pytorch_tanh")     # Gemma2Config's default
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation={act!r}: only 'gelu_pytorch_tanh' (GeGLU with the tanh GELU) "
                             f"is implemented")
        if config.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True: only causal attention is implemented")
        # transformers 5 writes rope_parameters; 4.x wrote rope_theta and, for scaled variants, rope_scaling.
        rope = config.get("rope_parameters") or {}
        field, scaling = ("rope_parameters.rope_type", rope) if rope else ("rope_scaling", config.get("rope_scaling"))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{field}={rope_type!r}: only the default RoPE is implemented")
        names = {f.name for f in dataclasses.fields(cls)} - {"head_dim", "rope_theta", "layer_types"}
        fields = {name: config[name] for name in names if name in config}
        head_dim = config.get("head_dim", cls.head_dim)
        hidden = config.get("hidden_size", cls.hidden_size)
        heads = config.get("num_attention_heads", cls.num_attention_heads)
        if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            head_dim = hidden // heads                  # transformers' rule for a null head_dim
        return cls(**fields, head_dim=head_dim, rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                   layer_types=tuple(config.get("layer_types") or ()))

    def to_transformers(self, dtype: torch.dtype) -> dict:
        """config.json for transformers' Gemma2Model; fields not stored here (token ids, LM-head softcap, ...) are
        left to Gemma2Config's defaults, which the decoder stack's output does not depend on."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_theta"}
        return {"architectures": ["Gemma2Model"], "model_type": "gemma2", **fields,
                "layer_types": list(self.layer_types), "hidden_activation": "gelu_pytorch_tanh",
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "dtype": str(dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))    # Gemma stores the scale as an offset from 1

    def forward(self, x: Tensor) -> Tensor:
        # In fp32, and the scale applied before casting back: Gemma computes (x * w).to(dtype), not x.to(dtype) * w.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(length: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device
                 ) -> tuple[Tensor, Tensor]:
    """RoPE (RoFormer, arXiv 2104.09864 §3.2) for positions 0..L-1: cos, sin (1, 1, L, d) in the activations'
    dtype."""
    # Frequencies on the CPU in fp32, then moved: transformers computes them once at construction, on the CPU.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))          # (d/2,)
    freqs = torch.arange(length, device=device)[None, :, None].float() * inv_freq.to(device)          # (1, L, d/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]                                               # (1, 1, L, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)                   # dimension i pairs with i + d/2 (not with i + 1)
    return torch.cat((-x2, x1), dim=-1)


def attention_bias(mask: Tensor, window: int | None, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 key mask -> (B, 1, L, L) additive logit bias: 0 where query i may see key j (j <= i, j not padding,
    and on sliding layers i - j < window), else the dtype's lowest value, as transformers' eager mask. Right padding
    leaves the real tokens' rows unchanged. A row that sees no key (a pad more than `window` past the last real
    token) softmaxes to uniform weights over all keys, in transformers too."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    allowed = pos[None, :] <= pos[:, None]                                      # (L, L) causal
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)              # the last `window` keys only
    allowed = allowed[None, None] & mask.bool()[:, None, None, :]               # (B, 1, L, L)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma2Config):
        super().__init__()
        h, kv, d, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(D, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, D, bias=cfg.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:   # x: (B, L, D)
        B, L, _ = x.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, h, d).transpose(1, 2)                     # (B, h, L, d)
        k = self.k_proj(x).view(B, L, kv, d).transpose(1, 2)                    # (B, kv, L, d)
        v = self.v_proj(x).view(B, L, kv, d).transpose(1, 2)                    # (B, kv, L, d)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # GQA by copying each key/value head for its h / kv query heads: the same tensors transformers multiplies.
        k, v = (t[:, :, None].expand(B, kv, h // kv, L, d).reshape(B, h, L, d) for t in (k, v))   # (B, h, L, d)
        logits = torch.matmul(q, k.transpose(2, 3)) * self.scale               # (B, h, L, L)
        if self.softcap is not None:
            # Soft-capping keeps logits in (-cap, cap) (arXiv 2408.00118 §2); it comes before the mask.
            logits = torch.tanh(logits / self.softcap) * self.softcap
        probs = F.softmax(logits + bias, dim=-1, dtype=torch.float32).to(q.dtype)   # (B, h, L, L)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, L, h * d)       # (B, L, h d)
        return self.o_proj(out)                                                 # (B, L, D)


class GeGLU(nn.Module):
    def __init__(self, cfg: Gemma2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:                                     # (B, L, D) -> (B, L, F) -> (B, L, D)
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma2Config, sliding: bool):
        super().__init__()
        self.sliding = sliding
        self.self_attn = Attention(cfg)
        self.mlp = GeGLU(cfg)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        # Gemma-2 normalises both the input and the output of each branch (arXiv 2408.00118 §2).
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(D, eps), RMSNorm(D, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(D, eps), RMSNorm(D, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:   # (B, L, D)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, bias))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Decoder(nn.Module):
    """transformers' Gemma2Model as SANA uses it: `model(ids, attention_mask=mask)[0]` is the last hidden state.
    Module and parameter names are Gemma2Model's, so state dicts load both ways without a key map."""
    hub_class = ("transformers", "Gemma2Model")     # what Pipeline.save_pretrained names the saved folder

    def __init__(self, cfg: Gemma2Config):
        super().__init__()
        self.cfg = cfg
        # A given weight (`_weight`) skips nn.Embedding's random init: on the meta device its normal_ imports
        # torch._dynamo, about 2 s of a busy 2-core machine's start-up. The loader replaces it anyway.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind == "sliding_attention") for kind in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False
                ) -> tuple[Tensor]:
        """input_ids (B, L), attention_mask (B, L) 1 = real token (right padding) -> ((B, L, D),)."""
        if use_cache:
            raise ValueError("use_cache=True: this decoder keeps no KV cache (SANA runs one forward pass)")
        cfg, w = self.cfg, self.embed_tokens.weight
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        # sqrt(D) rounded to the weights' dtype first, as transformers does (in bf16, sqrt(3072) becomes 55.5).
        x = self.embed_tokens(input_ids) * torch.tensor(cfg.hidden_size ** 0.5, dtype=w.dtype, device=w.device)
        cos, sin = rope_cos_sin(input_ids.shape[1], cfg.head_dim, cfg.rope_theta, x.dtype, x.device)  # (1, 1, L, d)
        full = attention_bias(mask, None, x.dtype)                                                 # (B, 1, L, L)
        local = attention_bias(mask, cfg.sliding_window, x.dtype) if "sliding_attention" in cfg.layer_types else full
        for layer in self.layers:
            x = layer(x, cos, sin, local if layer.sliding else full)                               # (B, L, D)
        return (self.norm(x),)

    def save_pretrained(self, folder: str | Path) -> None:
        """A transformers Gemma2Model folder (config.json, model.safetensors) for AutoModel and diffusers."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = next(self.parameters()).dtype
        write_json(folder / "config.json", self.cfg.to_transformers(dtype))
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})   # transformers reads "format"


def decoder_weights(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gemma2Model keys as they are; Gemma2ForCausalLM's without their "model." prefix and without the LM head,
    which SANA does not use (it reads hidden states, sana-spec §3.1)."""
    return {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}


def load_gemma2(folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> Gemma2Decoder:
    """A transformers Gemma2Model or Gemma2ForCausalLM folder (config.json, weights single or sharded, optionally
    a variant such as "bf16") -> the frozen decoder stack in `dtype`. Errors name the folder and the field."""
    return _load_component(folder, Gemma2Decoder, Gemma2Config.from_transformers,
                           lambda sd, cfg: decoder_weights(sd), dtype, variant, stem="model")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


class TokenizerNotReproducible(ValueError):
    """A tokenizer folder that JsonTokenizer cannot read exactly as transformers does; use AutoTokenizer for it."""


# tokenizer_config.json's tokenizer_class -> the class AutoTokenizer builds for it (transformers 5.23). The generic
# backend uses tokenizer.json as it is; GemmaTokenizer keeps the file's vocabulary, merges, added tokens and
# post-processor, and rebuilds the rest (models/gemma/tokenization_gemma.py), which `from_folder` repeats.
TOKENIZER_CLASSES = {"TokenizersBackend": "TokenizersBackend", "PreTrainedTokenizerFast": "TokenizersBackend",
                     "GemmaTokenizer": "GemmaTokenizer", "GemmaTokenizerFast": "GemmaTokenizer"}
GEMMA_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                        "mask_token": "<mask>"}    # GemmaTokenizer's defaults
LARGE_INTEGER = int(1e20)                          # transformers: a model_max_length above this means "no limit"


@dataclass(frozen=True)
class TokenIds:
    input_ids: Tensor | list       # (B, L) int64 with return_tensors="pt"; lists of ids otherwise
    attention_mask: Tensor | list  # same shape, 1 = real token


def _content(token) -> str | None:
    return token["content"] if isinstance(token, dict) else token    # tokenizer configs store str or AddedToken dicts


def _token_list(tokens) -> list:
    return list(tokens.values()) if isinstance(tokens, dict) else list(tokens or [])   # dict: model-specific names


class JsonTokenizer:
    """What TextEncoder needs of transformers' tokenizer (len, pad_token_id, encode, __call__), read from a
    tokenizer.json folder with the `tokenizers` library alone; `from_folder` refuses folders where that would not
    give transformers' ids."""

    def __init__(self, backend, pad_token: str | None, padding_side: str, truncation_side: str,
                 model_max_length: int, hub_class: tuple[str, str], files: tuple[Path, ...] = ()):
        self.backend, self.pad_token = backend, pad_token
        self.pad_token_id = None if pad_token is None else backend.token_to_id(pad_token)
        self.padding_side, self.truncation_side, self.model_max_length = padding_side, truncation_side, model_max_length
        self.hub_class, self.files = hub_class, files      # for Pipeline.save_pretrained

    @classmethod
    def from_folder(cls, folder: str | Path) -> JsonTokenizer:
        from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
        folder = Path(folder)
        file, config_file, specials_file = (folder / n for n in ("tokenizer.json", "tokenizer_config.json",
                                                                 "special_tokens_map.json"))
        if not file.is_file() or not config_file.is_file():
            raise TokenizerNotReproducible(f"{folder}: no tokenizer.json and tokenizer_config.json")
        config = json.loads(config_file.read_text())
        kind = TOKENIZER_CLASSES.get(config.get("tokenizer_class"))
        if kind is None:
            raise TokenizerNotReproducible(f"tokenizer_class={config.get('tokenizer_class')!r}: not one of "
                                           f"{sorted(TOKENIZER_CLASSES)}")
        # Settings that make transformers change the pipeline, or add tokens, in ways not repeated here.
        if (folder / "added_tokens.json").exists() or any(config.get(k) for k in ("auto_map", "add_prefix_space",
                                                                                 "fix_mistral_regex")):
            raise TokenizerNotReproducible(f"{folder}: added_tokens.json, auto_map, add_prefix_space or "
                                           f"fix_mistral_regex")
        backend = Tokenizer.from_file(str(file))
        if backend.truncation is not None or backend.padding is not None:
            raise TokenizerNotReproducible(f"{file}: truncation/padding stored in the file")

        # Special tokens as transformers resolves them: class defaults, tokenizer_config.json, then (legacy
        # folders without added_tokens_decoder) special_tokens_map.json.
        specials = dict(GEMMA_SPECIAL_TOKENS) if kind == "GemmaTokenizer" else {}
        specials.update({k: v for k, v in config.items() if k.endswith("_token") and not isinstance(v, bool)})
        extra = [*_token_list(config.get("additional_special_tokens")),
                 *_token_list(config.get("extra_special_tokens"))]
        added = backend.get_added_tokens_decoder()                                  # {id: AddedToken}
        if "added_tokens_decoder" in config:
            flags = ("content", "special", "normalized", "lstrip", "rstrip", "single_word")
            stored = {int(i): tuple(t.get(f) for f in flags) for i, t in config["added_tokens_decoder"].items()}
            if stored != {i: tuple(getattr(t, f) for f in flags) for i, t in added.items()}:
                raise TokenizerNotReproducible(f"{config_file}: added_tokens_decoder differs from {file.name}")
        elif specials_file.is_file():
            legacy = json.loads(specials_file.read_text())
            specials.update({k: v for k, v in legacy.items() if k.endswith("_token")})
            extra += _token_list(legacy.get("additional_special_tokens"))
        # transformers (re)adds every special token as a special, unnormalised added token: a no-op only if each
        # already is one; otherwise it would change the ids (and maybe len()).
        by_content = {t.content: t for t in added.values()}
        for token in (_content(t) for t in [*specials.values(), *extra] if t is not None):
            if token not in by_content or not by_content[token].special or by_content[token].normalized:
                raise TokenizerNotReproducible(f"special token {token!r}: not a special added token of {file.name}")

        if kind == "GemmaTokenizer":
            if type(backend.model).__name__ != "BPE":
                raise TokenizerNotReproducible(f"{file}: GemmaTokenizer needs a BPE model")
            # GemmaTokenizer.__init__'s pipeline around the file's vocabulary and merges.
            backend.normalizer = normalizers.Replace(" ", "▁")
            backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
            model = backend.model
            model.fuse_unk, model.byte_fallback, model.dropout, model.ignore_merges = True, True, None, False
            model.continuing_subword_prefix = model.end_of_word_suffix = None
            model.unk_token = str(_content(specials["unk_token"]))
        # transformers ignores add_bos_token / add_eos_token when there is a tokenizer.json: the file's
        # post-processor decides (it adds <bos> for Gemma). Without one it installs a template that adds nothing.
        if backend.post_processor is None:
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        hub_class = ("transformers", kind)
        files = (file, config_file) + ((specials_file,) if specials_file.is_file() else ())
        return cls(backend, _content(specials.get("pad_token")),
                   padding_side=config.get("padding_side", "left" if kind == "GemmaTokenizer" else "right"),
                   truncation_side=config.get("truncation_side", "right"),
                   model_max_length=config.get("model_max_length", int(1e30)), hub_class=hub_class, files=files)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens).input_ids

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, add_special_tokens: bool = True, padding_side: str | None = None,
                 return_tensors: str | None = None) -> TokenIds:
        """transformers' rules for these arguments (PreTrainedTokenizerBase._get_padding_truncation_strategies)."""
        pads = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
        if padding not in pads:
            raise ValueError(f"padding={padding!r}: must be one of {list(pads)}")
        if truncation not in (None, False, True, "longest_first", "do_not_truncate"):
            raise ValueError(f"truncation={truncation!r}: only longest_first is implemented")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None")
        pad = pads[padding]
        if max_length is not None and padding is False and truncation is None:
            truncation = True                   # transformers truncates when only max_length is given
        truncate = truncation not in (None, False, "do_not_truncate")
        if max_length is None:
            limit = self.model_max_length if self.model_max_length <= LARGE_INTEGER else None
            pad = None if pad == "max_length" and limit is None else pad
            truncate, max_length = truncate and limit is not None, limit
        if pad is not None and self.pad_token_id is None:
            raise ValueError("padding: this tokenizer has no pad token")
        b = self.backend
        if truncate:
            b.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        else:
            b.no_truncation()
        if pad is not None:
            b.enable_padding(direction=padding_side or self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                             pad_token=self.pad_token, length=max_length if pad == "max_length" else None)
        else:
            b.no_padding()
        rows = b.encode_batch([text] if isinstance(text, str) else list(text), add_special_tokens=add_special_tokens)
        ids, mask = [r.ids for r in rows], [r.attention_mask for r in rows]
        if return_tensors == "pt":
            if len({len(r) for r in ids}) > 1:
                raise ValueError("return_tensors='pt': rows of different lengths; pass padding=True")
            return TokenIds(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))
        return TokenIds(ids[0], mask[0]) if isinstance(text, str) else TokenIds(ids, mask)

    def save_pretrained(self, folder: str | Path) -> None:
        """The files this tokenizer was read from, unchanged: AutoTokenizer reads them as before."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            shutil.copyfile(f, folder / f.name)
