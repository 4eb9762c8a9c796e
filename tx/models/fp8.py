"""FP8 block-quantised weights, as the hub's DeepSeek-V3 checkpoints store them.

A weight ``W [rows, cols]`` is stored as ``<name>`` float8_e4m3fn and ``<name>_scale_inv`` float32
``[ceil(rows / 128), ceil(cols / 128)]``, one scale per 128 x 128 block: ``W = fp8 value * scale_inv`` of its block.
:func:`dequantize` gives ``W`` in float32 (one rounding: the fp8 value is exact in fp32), one tensor at a time while
loading.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from tx.errors import CheckpointError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"


def dequantize(values: np.ndarray, scale_inv: np.ndarray, name: str = "weight", block: int = BLOCK) -> np.ndarray:
    """``[..., rows, cols]`` float8_e4m3fn and ``[..., ceil(rows / block), ceil(cols / block)]`` scales -> float32."""
    rows, cols = values.shape[-2:]
    want = (*values.shape[:-2], -(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{name}: FP8 weight {tuple(values.shape)} needs {name}{SCALE_SUFFIX} of shape {want} (one scale per "
            f"{block} x {block} block), found {tuple(scale_inv.shape)}"
        )
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=-2), block, axis=-1)[..., :rows, :cols]
    return values.astype(np.float32) * scale
