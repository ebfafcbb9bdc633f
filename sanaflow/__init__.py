"""sanaflow: SANA text-to-image (arXiv 2410.10629) in plain PyTorch."""
from .dcae import DCAE, DCAE_PRESETS, DCAEConfig
from .dit import DIT_PRESETS, DiT, DiTConfig
from .hub import CheckpointError, load_dcae, load_dit, load_original_dcae, load_original_dit
from .pipeline import GenerateRequest, Pipeline, load_default
from .text import TextConfig, TextEncoder

__all__ = ["DCAE", "DCAE_PRESETS", "DCAEConfig", "DIT_PRESETS", "DiT", "DiTConfig", "CheckpointError", "load_dcae",
           "load_dit", "load_original_dcae", "load_original_dit", "GenerateRequest", "Pipeline", "load_default",
           "TextConfig", "TextEncoder"]
