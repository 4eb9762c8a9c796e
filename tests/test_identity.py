"""Attached adapters are a no-op at init: every family, connector kind, n, with/without LoRA, trainable on/off.

fp32 bound (the issue's): max |logits(adapted) - logits(base)| <= 1e-6 x max |logits|, and exactly 0 for n = 1.
"""

import itertools

import numpy as np
import pytest
from fixtures_models import FAMILY_NAMES, make_checkpoint

import tx
from tx.adapters.connector import MAX_LITE_STREAMS

KINDS = ("static", "dynamic", "mhc")


def ids_and_mask(vocab):
    ids = np.random.default_rng(0).integers(3, vocab, size=(2, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


def check(folder, kind, n, lora, trainable=True, dtype="float32", **extra):
    model = tx.load_model(folder, dtype=dtype)
    tx.attach(
        model,
        lora=tx.LoRAConfig(rank=4, alpha=8) if lora else None,
        connector=tx.ConnectorConfig(expansion_rate=n, kind=kind, trainable=trainable, **extra),
    )
    ids, mask = ids_and_mask(model.config.vocab_size)
    return tx.verify_identity(model, ids, mask)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_n1_is_exactly_the_base(checkpoints, family):
    for lora in (False, True):
        report = check(checkpoints[family][0], "mhc", 1, lora)
        assert report.max_abs_diff == 0.0, report
    for kind in ("static", "dynamic", "mhc_lite"):  # n = 1 and fracs = 1 installs nothing, whatever the kind
        report = check(checkpoints[family][0], kind, 1, True)
        assert report.max_abs_diff == 0.0, (kind, report)


@pytest.mark.parametrize("family", ["qwen3"])
def test_identity_quick(checkpoints, family):
    for kind in KINDS:
        report = check(checkpoints[family][0], kind, 4, True)
        assert report.passed and report.relative_diff <= 1e-6, report


def grid(family: str) -> list[tuple[str, int, bool]]:
    """Six (kind, n, lora) cases per family; over the five families every kind meets every n in (2, 3, 4) with
    and without LoRA (a rotation: family f gives kind k the n values 2 + (f + k) % 3 with LoRA and
    2 + (f + k + 1) % 3 without)."""
    f = FAMILY_NAMES.index(family)
    return [
        (kind, 2 + (f + k + shift) % 3, lora) for k, kind in enumerate(KINDS) for shift, lora in ((0, True), (1, False))
    ]


def test_grid_covers_every_combination():
    cases = {case for family in FAMILY_NAMES for case in grid(family)}
    assert cases == set(itertools.product(KINDS, (2, 3, 4), (False, True)))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_identity_grid(checkpoints, family):
    worst = 0.0
    for kind, n, lora in grid(family):
        report = check(checkpoints[family][0], kind, n, lora)
        assert report.relative_diff <= 1e-6, (kind, n, lora, str(report))
        assert report.max_abs_logit > 0.5
        worst = max(worst, report.relative_diff)
    print(f"{family}: worst relative identity error {worst:.2e}")


@pytest.mark.parametrize("kind", KINDS)
def test_identity_frozen_connector(checkpoints, kind):
    report = check(checkpoints["llama"][0], kind, 3, True, trainable=False)
    assert report.relative_diff <= 1e-6, report


def test_identity_bf16(checkpoints):
    # In bf16 XLA rounds (and fuses away roundings) differently once the residual is widened, so exact equality is
    # not expected. The bound: adapting must move the bf16 logits less than bf16 itself moves them away from fp32,
    # i.e. |adapted_bf16 - base_bf16| <= |base_bf16 - base_fp32| (max over tokens), for every kind at n = 4.
    folder = checkpoints["qwen3"][0]
    ids, mask = ids_and_mask(101)
    valid = mask.astype(bool)
    fp32 = np.asarray(tx.load_model(folder)(ids, attention_mask=mask))
    bf16 = np.asarray(tx.load_model(folder, dtype="bfloat16")(ids, attention_mask=mask), np.float32)
    rounding = np.abs(bf16 - fp32)[valid].max()
    assert rounding > 0
    for kind in KINDS:
        report = check(folder, kind, 4, True, dtype="bfloat16")
        assert report.max_abs_diff <= rounding, (str(report), rounding)


# ---------------------------------------------------------------- variants: mhc_lite, frac-connections, chosen layers


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("identity_moe") / "qwen3_moe")[0]


def variant_cases(family: str) -> list[tuple[str, int, dict]]:
    """mhc_lite at every n it allows (2..MAX_LITE_STREAMS; n = 1 is the base, above), and frac-connections at
    n = 1..4 with m = 2 plus n = 1 with m = 4, the kind (static / dynamic) alternating by family and n."""
    f = (FAMILY_NAMES + ("qwen3_moe",)).index(family)
    lite = [("mhc_lite", n, {}) for n in range(2, MAX_LITE_STREAMS + 1)]
    fracs = [(("static", "dynamic")[(f + n) % 2], n, {"fracs": 2}) for n in range(1, 5)]
    return lite + fracs + [(("dynamic", "static")[f % 2], 1, {"fracs": 4})]


@pytest.mark.parametrize("family", ["qwen3"])
def test_identity_variants_quick(checkpoints, family):
    for kind, n, extra in [("mhc_lite", 4, {}), ("dynamic", 2, {"fracs": 2}), ("mhc", 4, {"layers": [1]})]:
        report = check(checkpoints[family][0], kind, n, True, **extra)
        assert report.relative_diff <= 1e-6 and report.max_abs_logit > 0.5, (kind, n, extra, str(report))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES + ("qwen3_moe",))
def test_identity_variants_grid(checkpoints, moe_checkpoint, family):
    folder = moe_checkpoint if family == "qwen3_moe" else checkpoints[family][0]
    worst = 0.0
    for kind, n, extra in variant_cases(family):
        report = check(folder, kind, n, True, **extra)
        assert report.relative_diff <= 1e-6, (kind, n, extra, str(report))
        assert report.max_abs_logit > 0.5
        worst = max(worst, report.relative_diff)
    # connectors on chosen layers: only the last layer, then every other one
    layers = tx.load_model(folder).config.num_layers
    for chosen in ([layers - 1], list(range(0, layers, 2))):
        report = check(folder, "mhc_lite", 4, True, layers=chosen)
        assert report.relative_diff <= 1e-6, (chosen, str(report))
        worst = max(worst, report.relative_diff)
    print(f"{family}: worst relative identity error of the variants {worst:.2e}")


def test_variant_cases_cover_every_n():
    cases = {
        (kind, n, tuple(extra.items()))
        for fam in FAMILY_NAMES + ("qwen3_moe",)
        for kind, n, extra in variant_cases(fam)
    }
    assert {n for kind, n, _ in cases if kind == "mhc_lite"} == set(range(2, MAX_LITE_STREAMS + 1))
    for kind in ("static", "dynamic"):  # each frac kind meets every n
        assert {n for k, n, e in cases if k == kind and e == (("fracs", 2),)} == {1, 2, 3, 4}
        assert (kind, 1, (("fracs", 4),)) in cases
