"""FP4 (E2M1) expert weights with one scale per 1 x 32 block, as the hub's DeepSeek-V4 checkpoints store them.

The files are FP8 (:mod:`tx.models.fp8`) except the routed experts (``quantization_config.expert_dtype: "fp4"``).
An expert weight ``W [rows, cols]`` is stored as two tensors:

- ``<name>`` packed FP4, two E2M1 values per byte, the low nibble first (``W[r, 2k]`` in bits 0-3 of byte ``k``
  of row ``r``, ``W[r, 2k + 1]`` in bits 4-7): safetensors ``I8`` ``[rows, cols / 2]`` (torch int8), or ``F4``
  (torch float4_e2m1fn_x2, whose header counts values: ``[rows, cols]``);
- its scale, ``<module>.weight_scale_inv`` (transformers' name) or ``<module>.scale`` (the upstream files' name),
  ``[rows, ceil(cols / 32)]``: one scale per 32 consecutive values of a row, float8_e8m0fnu (``F8_E8M0``, a power
  of two), E8M0 bytes (``U8``: ``2 ** (byte - 127)``) or a float dtype (float32, bfloat16, ...).

``W = e2m1 value * scale`` of its block. :func:`dequantize` gives ``W`` in float32, one tensor at a time while loading
(with E8M0 scales exactly: a small float times a power of two).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from tx.errors import CheckpointError
from tx.models.mxfp4 import FP4_VALUES

BLOCK = 32  # values of a row per scale
INT8 = np.dtype(np.int8)
# the dtype tx.safetensors_io reports for an ``F4`` tensor (its shape counts values; its get() gives the bytes)
FP4 = np.dtype(ml_dtypes.float4_e2m1fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_FLOATS = (np.dtype(ml_dtypes.bfloat16), E8M0, np.dtype(ml_dtypes.float8_e4m3fn))
SCALE_SUFFIXES = ("_scale_inv", ".scale")  # "<x>.weight" -> "<x>.weight_scale_inv" or "<x>.scale"


def is_packed(dtype) -> bool:
    """Whether a stored tensor of this dtype is packed FP4 when it has a scale (transformers' rule: int8 or FP4)."""
    return np.dtype(dtype) in (INT8, FP4)


def scale_keys(key: str) -> tuple[str, ...]:
    """The names the scale of the quantised weight ``key`` (FP8 or FP4) may have: transformers', then upstream's."""
    names = (key + SCALE_SUFFIXES[0],)
    if key.endswith(".weight"):
        names += (key[: -len(".weight")] + SCALE_SUFFIXES[1],)
    return names


def scale_key(key: str, names) -> str | None:
    """The scale of the quantised weight ``key`` among ``names`` (a checkpoint's tensors), or None."""
    return next((name for name in scale_keys(key) if name in names), None)


def unpacked_shape(shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The shape of the weight a packed FP4 tensor of this stored shape and dtype holds."""
    shape = tuple(shape)
    return shape if np.dtype(dtype) == FP4 else (*shape[:-1], 2 * shape[-1])


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale shape a weight of (unpacked) ``shape`` needs: one scale per 1 x 32 block."""
    return (*shape[:-1], -(-shape[-1] // BLOCK))


def scale_values(scale: np.ndarray, name: str = "scale") -> np.ndarray:
    """A stored scale as float32: E8M0 bytes (uint8) are ``2 ** (byte - 127)``, float dtypes are converted."""
    dtype = np.dtype(scale.dtype)
    if dtype == np.uint8:
        with np.errstate(over="ignore"):  # byte 255 (E8M0's NaN) gives inf, as in transformers
            return np.ldexp(np.float32(1), scale.astype(np.int32) - 127)
    if dtype.kind == "f" or dtype in _FLOATS:
        return scale.astype(np.float32)
    raise CheckpointError(
        f"{name}: scale of dtype {dtype} is not supported; expected float8_e8m0fnu, E8M0 bytes (uint8) or a float"
    )


def dequantize(packed: np.ndarray, scale: np.ndarray, name: str = "weight", scale_name: str | None = None):
    """``[..., rows, cols / 2]`` packed FP4 bytes (int8 or uint8) and ``[..., rows, ceil(cols / 32)]`` scales ->
    float32 ``[..., rows, cols]``."""
    scale_name = scale_name or name + SCALE_SUFFIXES[0]
    if packed.ndim < 2 or np.dtype(packed.dtype).itemsize != 1:
        raise CheckpointError(
            f"{name}: packed FP4 weight must hold bytes [..., rows, cols / 2], found {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    shape = (*packed.shape[:-1], 2 * packed.shape[-1])
    want = scale_shape(shape)
    if tuple(scale.shape) != want:
        raise CheckpointError(
            f"{name}: FP4 weight {tuple(packed.shape)} (packed two per byte: {shape} values) needs {scale_name} of "
            f"shape {want} (one scale per 1 x {BLOCK} block), found {tuple(scale.shape)}"
        )
    codes = packed.view(np.uint8)
    groups = want[-1]
    out = np.zeros((*want, BLOCK), np.float32)
    flat = out.reshape(*want[:-1], groups * BLOCK)
    flat[..., 0 : shape[-1] : 2] = FP4_VALUES[codes & 0x0F]
    flat[..., 1 : shape[-1] : 2] = FP4_VALUES[codes >> 4]
    out *= scale_values(scale, scale_name)[..., None]
    return flat[..., : shape[-1]]
