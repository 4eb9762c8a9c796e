"""MXFP4 (OCP microscaling FP4) tensors, as gpt-oss checkpoints on the hub store their experts.

A weight ``W`` of shape ``[..., rows, cols]`` is stored as two tensors:

- ``<name>_blocks`` uint8 ``[..., rows, cols / 32, 16]``: 32 FP4 (E2M1) values per block, two per byte, the
  low nibble first;
- ``<name>_scales`` uint8 ``[..., rows, cols / 32]``: one E8M0 scale per block, the power of two ``scale - 127``.

:func:`dequantize` gives ``W`` in float32 (exactly: every value is a small float times a power of two), one
tensor at a time while loading.
"""

from __future__ import annotations

import numpy as np

from tx.errors import CheckpointError

# E2M1 code -> value: sign bit 3, then exponent 2 bits and mantissa 1 bit
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
BLOCK = 32


def dequantize(blocks: np.ndarray, scales: np.ndarray, name: str = "weight") -> np.ndarray:
    """``[..., G, 16]`` uint8 blocks and ``[..., G]`` uint8 scales -> float32 ``[..., G * 32]``."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"{name}: MXFP4 blocks and scales must be uint8, found {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(
            f"{name}: MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match; expected "
            f"blocks [..., G, {BLOCK // 2}] and scales [..., G]"
        )
    values = np.empty((*blocks.shape[:-1], BLOCK), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)
