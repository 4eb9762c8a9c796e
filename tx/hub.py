"""Name or path -> local folder. Only JSON, safetensors and tokenizer files are ever fetched or read."""

from __future__ import annotations

import os
from pathlib import Path

from tx.errors import CheckpointError

# What tx reads from a checkpoint folder; never pickles, never code.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Return the local folder of a checkpoint: the folder itself, or a hub snapshot.

    A hub id (``org/name``) is fetched with ``huggingface_hub.snapshot_download`` restricted to
    :data:`ALLOW_PATTERNS`; with ``HF_HUB_OFFLINE=1`` only the local cache is used.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise CheckpointError(f"no such folder: {path}. Pass a checkpoint folder or a hub id such as Qwen/Qwen3-0.6B")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # the hub client raises many types; the user needs one sentence
        reason = type(exc).__name__
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({reason}: {detail[:200]}). Check the id and your network, or pass a local folder "
            "(set HF_HUB_OFFLINE=1 to use only the local cache)."
        ) from None
