"""DeepSeek-V4's FP4 experts (tx.models.fp4) against transformers' own dequantisation (Fp8Dequantize).

Weights are random fp32, quantised here to the hub's layout: packed E2M1 (int8 or float4_e2m1fn_x2, two values a
byte, the low nibble first) with one scale per 1 x 32 block of a row (float8_e8m0fnu, E8M0 bytes or float32).
tx must give transformers' values bit for bit, from the arrays and from safetensors files, and name the tensor
and the shapes when a scale is mis-shaped or missing.
"""

import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

import tx
from tx.errors import CheckpointError
from tx.models import fp4
from tx.models.loader import read_tensor, release_tensor
from tx.safetensors_io import open_checkpoint


def quantise(w: np.ndarray, scale_fmt: str = "e8m0"):
    """(packed FP4 bytes uint8 [..., rows, cols / 2], scales [..., rows, ceil(cols / 32)]) of a float32 weight:
    e8m0 scales the power of two 2 ** ceil(log2(amax / 6)) (as DeepSeek's quantiser), float32 ones amax / 6."""
    rows, cols = w.shape[-2:]
    groups = -(-cols // 32)
    padded = np.zeros((*w.shape[:-1], groups * 32), np.float32)
    padded[..., :cols] = w
    blocks = padded.reshape(*w.shape[:-1], groups, 32)
    amax = np.abs(blocks).max(-1)
    amax = np.where(amax > 0, amax, 6.0).astype(np.float32)
    if scale_fmt == "e8m0":
        exponent = np.ceil(np.log2(amax / 6.0)).astype(np.int32)
        scale = np.ldexp(np.float32(1), exponent)
        stored = (exponent + 127).astype(np.uint8)  # E8M0 bytes
    else:
        scale = stored = (amax / np.float32(6.0)).astype(np.float32)
    values = (blocks / scale[..., None]).astype(ml_dtypes.float4_e2m1fn)  # round to nearest E2M1
    codes = values.view(np.uint8).reshape(*w.shape[:-1], groups * 32)[..., :cols] & 0x0F
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, stored


def to_torch(packed: np.ndarray, scale: np.ndarray, weight_dtype: str, scale_dtype: str):
    """The tensors as a checkpoint holds them: int8 or float4_e2m1fn_x2 weights, e8m0 / uint8 / float32 scales."""
    q = torch.from_numpy(packed.copy())
    q = q.view(torch.int8) if weight_dtype == "int8" else q.view(torch.float4_e2m1fn_x2)
    s = torch.from_numpy(scale.copy())
    if scale_dtype == "e8m0":
        s = s.view(torch.float8_e8m0fnu)
    return q, s


def reference(q: torch.Tensor, s: torch.Tensor, output_dtype=torch.float32) -> np.ndarray:
    """transformers' dequantisation of one (weight, weight_scale_inv) pair, as its FP8 loader applies it."""
    out = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=output_dtype)
    return out.float().numpy()


def fp8_quantise(w: torch.Tensor, block: int = 128):
    """(float8_e4m3fn values, float8_e8m0fnu scale per block x block) of a 2-D weight: the power of two
    2 ** ceil(log2(amax / 448)), as DeepSeek-V4's files (``scale_fmt: ue8m0``)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.reshape(nr, block, nc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (blocks / scale[:, None, :, None]).reshape(nr * block, nc * block)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)  # -0.0 and NaN payloads count too


def weights(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * np.exp(rng.uniform(-4, 2, (*shape[:-1], 1)))).astype(np.float32)
    w[..., 0, :16] = fp4.FP4_VALUES  # every code once, including -0.0
    w[..., 1, :32] = 0.0  # an all-zero block
    return w


SCALES = [("int8", "e8m0"), ("int8", "uint8"), ("int8", "float32"), ("fp4_x2", "e8m0")]


@pytest.mark.parametrize("weight_dtype,scale_dtype", SCALES)
@pytest.mark.parametrize("shape", [(3, 24, 96), (40, 64), (16, 16)])
def test_dequantize_matches_transformers_bit_for_bit(shape, weight_dtype, scale_dtype):
    w = weights(shape)
    packed, scale = quantise(w, "float32" if scale_dtype == "float32" else "e8m0")
    q, s = to_torch(packed, scale, weight_dtype, scale_dtype)
    want = reference(q, s)
    stored_scale = s.view(torch.uint8).numpy().view(fp4.E8M0) if scale_dtype == "e8m0" else scale
    got = fp4.dequantize(packed.view(np.int8), stored_scale, "w")
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(bits(got), bits(want))
    assert np.abs(got - w).max() <= np.abs(w).max()  # and it is a quantisation of w
    if scale_dtype == "e8m0":  # transformers' default output for 1-byte scales is bfloat16: the same values
        np.testing.assert_array_equal(
            bits(got.astype(ml_dtypes.bfloat16).astype(np.float32)), bits(reference(q, s, None))
        )


def test_dequantize_is_exact_on_every_code_and_scale():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every pair of nibbles: 16 rows of 32 values
    exponents = np.arange(1, 255, 16, dtype=np.uint8)[:16].reshape(16, 1)  # 2 ** -126 .. 2 ** 114
    q, s = to_torch(codes, exponents, "int8", "e8m0")
    got = fp4.dequantize(codes, exponents.view(fp4.E8M0), "w")
    np.testing.assert_array_equal(bits(got), bits(reference(q, s)))
    low = fp4.FP4_VALUES[codes & 0x0F] * np.ldexp(np.float32(1), exponents.astype(np.int32) - 127)
    np.testing.assert_array_equal(got[:, 0::2], low)  # the low nibble is the first value of its pair


def write_checkpoint(folder, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def dtypes_on_disk(path) -> dict:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_read_tensor_from_files_matches_transformers(tmp_path):
    """Upstream names (``w1.scale``) and transformers' (``weight_scale_inv``); int8 and F4 weights; e8m0, uint8
    and float32 scales: read_tensor dequantises each as transformers does and release_tensor releases its scale."""
    cases = {
        "layers.0.ffn.experts.0.w1.weight": ("int8", "e8m0", ".scale", (32, 64)),
        "layers.0.ffn.experts.0.w2.weight": ("fp4_x2", "e8m0", ".scale", (64, 32)),
        "model.layers.1.ffn.experts.1.w3.weight": ("int8", "uint8", "_scale_inv", (32, 96)),
        "model.layers.1.ffn.experts.2.w3.weight": ("int8", "float32", "_scale_inv", (8, 16)),
    }
    tensors, want = {}, {}
    for k, (key, (weight_dtype, scale_dtype, suffix, shape)) in enumerate(cases.items()):
        packed, scale = quantise(weights(shape, seed=k), "float32" if scale_dtype == "float32" else "e8m0")
        q, s = to_torch(packed, scale, weight_dtype, scale_dtype)
        scale_key = key[: -len(".weight")] + suffix if suffix == ".scale" else key + suffix
        tensors[key], tensors[scale_key] = q, s
        want[key] = reference(q, s)
    write_checkpoint(tmp_path, tensors)
    on_disk = dtypes_on_disk(tmp_path / "model.safetensors")
    assert (
        on_disk["layers.0.ffn.experts.0.w1.weight"] == "I8" and on_disk["layers.0.ffn.experts.0.w1.scale"] == "F8_E8M0"
    )
    assert on_disk["layers.0.ffn.experts.0.w2.weight"] == "F4"
    with open_checkpoint(tmp_path) as where:
        assert where["layers.0.ffn.experts.0.w2.weight"].shape("layers.0.ffn.experts.0.w2.weight") == (64, 32)
        for key in cases:
            got = read_tensor(where, key)
            np.testing.assert_array_equal(bits(got), bits(want[key]), err_msg=key)
            del got
            release_tensor(where, key)


def test_mis_shaped_scale_names_the_key_and_both_shapes(tmp_path):
    packed, scale = quantise(weights((32, 64)))
    with pytest.raises(CheckpointError, match=r"expert\.w1\.weight: FP4 weight \(32, 32\).*needs expert\.w1\.weight"):
        fp4.dequantize(packed, scale[:, :1], "expert.w1.weight")
    with pytest.raises(CheckpointError, match=r"of shape \(32, 2\) .*found \(32, 1\)"):
        fp4.dequantize(packed, scale[:, :1], "expert.w1.weight")
    key = "layers.0.ffn.experts.0.w1.weight"
    q, s = to_torch(packed, scale, "int8", "e8m0")
    write_checkpoint(tmp_path, {key: q, "layers.0.ffn.experts.0.w1.scale": s[:16].contiguous()})
    with open_checkpoint(tmp_path) as where, pytest.raises(CheckpointError) as err:
        read_tensor(where, key)
    msg = str(err.value)
    assert key in msg and "layers.0.ffn.experts.0.w1.scale" in msg and "(32, 2)" in msg and "(16, 2)" in msg


def test_missing_scale_is_reported_by_name(tmp_path):
    key = "layers.0.ffn.experts.0.w1.weight"
    packed, _ = quantise(weights((32, 64)))
    write_checkpoint(tmp_path, {key: torch.from_numpy(packed).view(torch.float4_e2m1fn_x2)})
    with open_checkpoint(tmp_path) as where, pytest.raises(CheckpointError) as err:
        read_tensor(where, key)
    msg = str(err.value)
    assert f"'{key}' is packed FP4 but its scale is missing" in msg
    assert "'layers.0.ffn.experts.0.w1.weight_scale_inv'" in msg and "'layers.0.ffn.experts.0.w1.scale'" in msg


@pytest.fixture(scope="module")
def v4_fp4(tmp_path_factory):
    """A DeepSeek-V4 checkpoint whose routed experts are FP4 (int8 + e8m0 ``scale``, the upstream names) and whose
    other linears are FP8 (+ e8m0 ``weight_scale_inv``), and the same checkpoint with those weights stored as
    transformers dequantises them."""
    from fixtures_models import make_checkpoint
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("v4_fp4")
    folder, _ = make_checkpoint("deepseek_v4", root / "source")
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    plain, quantised = dict(tensors), dict(tensors)
    experts = [k for k in tensors if ".ffn.experts." in k and k.endswith(".weight")]
    assert experts
    for k in experts:
        packed, scale = quantise(tensors[k].float().numpy())
        q, s = to_torch(packed, scale, "int8", "e8m0")
        quantised[k], quantised[k[: -len(".weight")] + ".scale"] = q, s
        plain[k] = torch.from_numpy(reference(q, s))
    # the other linears FP8 with power-of-two (ue8m0) scales in transformers' names, as the hub's V4 files
    linears = [k for k in tensors if re.search(r"\.(attn\.w(q_a|q_b|kv|o_a|o_b)|shared_experts\.w[123])\.weight$", k)]
    assert len(linears) > 20
    for k in linears:
        q, s = fp8_quantise(tensors[k].float())
        quantised[k], quantised[k + "_scale_inv"] = q, s
        plain[k] = torch.from_numpy(reference(q, s))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
        "expert_dtype": "fp4",
    }
    out = {}
    for name, ts in (("plain", plain), ("fp4", quantised)):
        d = root / name
        write_checkpoint(d, ts)
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = (d, ts)
    return out, experts[0]


def test_fp4_checkpoint_loads_as_its_dequantised_weights(v4_fp4):
    from flax import nnx

    (plain, _), (quantised, _) = v4_fp4[0]["plain"], v4_fp4[0]["fp4"]
    want, got = tx.load_model(plain), tx.load_model(quantised)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(want)), nnx.to_flat_state(nnx.state(got))):
        np.testing.assert_array_equal(np.asarray(b[...]), np.asarray(a[...]), err_msg=str(path))


@pytest.mark.parametrize("fault", ["missing", "mis-shaped"])
def test_fp4_checkpoint_with_a_bad_scale_names_it(v4_fp4, tmp_path, fault):
    (folder, tensors), key = v4_fp4[0]["fp4"], v4_fp4[1]
    scale = key[: -len(".weight")] + ".scale"
    tensors = dict(tensors)
    if fault == "missing":
        del tensors[scale]
        pattern = rf"tensor '{key}' is packed FP4 but its scale \('{key}_scale_inv' or '{scale}'\) is missing"
    else:
        rows, groups = tensors[scale].shape
        tensors[scale] = torch.ones(rows, groups + 1).to(torch.float8_e8m0fnu)
        pattern = (
            rf"tensor '{scale}' has shape \({rows}, {groups + 1}\) but its FP4 weight '{key}' .* "
            rf"needs \({rows}, {groups}\)"
        )
    bad = tmp_path / "bad"
    write_checkpoint(bad, tensors)
    (bad / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=pattern):
        tx.load_model(bad)
