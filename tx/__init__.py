"""tx: fine-tune pretrained Hugging Face checkpoints in JAX/Flax NNX with LoRA and hyper-connections."""

from tx.models.config import ModelConfig
from tx.models.decoder import CausalLM
from tx.models.loader import load_model

__version__ = "0.1.0"
__all__ = ["CausalLM", "ModelConfig", "load_model"]
