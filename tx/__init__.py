"""tx: fine-tune pretrained Hugging Face checkpoints in JAX/Flax NNX with LoRA and hyper-connections."""

from tx import errors
from tx.adapters.attach import adapters_disabled, attach, detach, merge_lora, trainable_parameters
from tx.adapters.connector import ConnectorConfig
from tx.adapters.lora import LoRAConfig
from tx.generate import generate
from tx.models.config import ModelConfig
from tx.models.decoder import CausalLM
from tx.models.loader import load_model
from tx.tokenizer import load_tokenizer
from tx.train.trainer import TrainConfig, Trainer, finetune
from tx.verify import verify_identity

__version__ = "0.1.0"
__all__ = [
    "CausalLM",
    "ConnectorConfig",
    "LoRAConfig",
    "ModelConfig",
    "TrainConfig",
    "Trainer",
    "adapters_disabled",
    "attach",
    "detach",
    "errors",
    "finetune",
    "generate",
    "load_model",
    "load_tokenizer",
    "merge_lora",
    "trainable_parameters",
    "verify_identity",
]


def __getattr__(name):  # save/load functions live in modules that import more; load them on first use
    if name in ("save_adapter", "load_adapter"):
        from tx.adapters import io

        return getattr(io, name)
    if name == "save_model":
        from tx.export import save_model

        return save_model
    raise AttributeError(f"module 'tx' has no attribute {name!r}")
