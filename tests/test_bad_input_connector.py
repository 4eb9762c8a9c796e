"""Bad connector settings, from Python, from attach() and from the shell: a ConfigError naming the field and value."""

import numpy as np
import pytest
from fixtures_run import model_folder, run_tx_batch

import tx
from tx.adapters.attach import has_connector, has_lora
from tx.adapters.connector import KINDS
from tx.errors import AdapterError, ConfigError


@pytest.mark.parametrize(
    "field, value",
    [
        ("expansion_rate", "4"),
        ("expansion_rate", 2.5),
        ("expansion_rate", 4.0),
        ("expansion_rate", True),
        ("expansion_rate", False),
        ("expansion_rate", None),
        ("expansion_rate", [4]),
        ("expansion_rate", 0),
        ("expansion_rate", -2),
        ("expansion_rate", np.float32(4)),
        ("kind", None),
        ("kind", 3),
        ("kind", "MHC"),
        ("kind", ""),
        ("kind", ["mhc"]),
        ("sinkhorn_iters", "20"),
        ("sinkhorn_iters", 2.5),
        ("sinkhorn_iters", True),
        ("sinkhorn_iters", 0),
        ("eps", "1e-6"),
        ("eps", float("nan")),
        ("eps", float("inf")),
        ("eps", -1e-6),
        ("eps", True),
        ("norm_eps", None),
        ("norm_eps", 0.5),
        ("trainable", "no"),
        ("trainable", 1),
        ("trainable", None),
        ("sinkhorn_balance", "false"),
        ("fracs", 0),
        ("fracs", "2"),
        ("fracs", 2.0),
        ("fracs", True),
        ("layers", "0,1"),
        ("layers", 3),
        ("layers", [-1]),
        ("layers", ["0"]),
    ],
)
def test_bad_value_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as info:
        tx.ConnectorConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(field), message
    assert repr(value) in message, message
    if field == "kind":
        assert all(repr(k) in message for k in KINDS)


def test_eps_too_large_for_the_streams():
    tx.ConnectorConfig(expansion_rate=4, kind="mhc", eps=0.05)
    with pytest.raises(ConfigError, match=r"eps must be below 1 / expansion_rate for kind 'mhc', got 0.09"):
        tx.ConnectorConfig(expansion_rate=16, kind="mhc", eps=0.09)


def test_mhc_lite_too_many_streams_and_fracs_with_mhc():
    tx.ConnectorConfig(expansion_rate=5, kind="mhc_lite")
    with pytest.raises(ConfigError, match=r"kind 'mhc_lite' works for expansion_rate 1..5, got 6: H_res mixes all n!"):
        tx.ConnectorConfig(expansion_rate=6, kind="mhc_lite")
    for kind in ("mhc", "mhc_lite"):
        with pytest.raises(ConfigError, match=rf"fracs > 1 works with kinds 'static', 'dynamic'.*got kind '{kind}'"):
            tx.ConnectorConfig(expansion_rate=2, kind=kind, fracs=2)
    with pytest.raises(ConfigError, match=r"layers must be a non-empty list"):
        tx.ConnectorConfig(layers=[])


def test_unknown_field_and_positional_values():
    with pytest.raises(TypeError, match="expansion"):
        tx.ConnectorConfig(expansion=4)
    with pytest.raises(TypeError):
        tx.ConnectorConfig(4)  # keyword-only: ConnectorConfig(4) could mean anything


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tx.load_model(model_folder(tmp_path_factory))


@pytest.mark.parametrize(
    "connector, error, match",
    [
        ({"expansion_rate": 4}, ConfigError, r"connector must be a tx.ConnectorConfig, got dict"),
        (4, ConfigError, r"connector must be a tx.ConnectorConfig, got int"),
        (tx.LoRAConfig(rank=2), ConfigError, r"connector must be a tx.ConnectorConfig, got LoRAConfig"),
    ],
)
def test_attach_wrong_object(model, connector, error, match):
    with pytest.raises(error, match=match):
        tx.attach(model, connector=connector)
    assert not has_connector(model)


@pytest.mark.parametrize(
    "connector, match",
    [
        (tx.ConnectorConfig(expansion_rate=2, kind="dynamic", fracs=3), r"fracs=3 must divide the hidden size 40"),
        (tx.ConnectorConfig(expansion_rate=2, layers=[0, 7]), r"connector layers \[7\] do not exist: the model has 2"),
    ],
)
def test_attach_connector_that_does_not_fit(model, connector, match):
    with pytest.raises(ConfigError, match=match):
        tx.attach(model, lora=tx.LoRAConfig(rank=2), connector=connector)
    assert not has_connector(model) and not has_lora(model)  # checked before anything changed


def test_attach_twice(model):
    tx.attach(model, connector=tx.ConnectorConfig(expansion_rate=2))
    try:
        with pytest.raises(AdapterError, match="already has a connector attached; call tx.detach"):
            tx.attach(model, connector=tx.ConnectorConfig(expansion_rate=3))
    finally:
        tx.detach(model)
    assert not has_connector(model)


CLI = {
    "--expansion-rate 0": (["--expansion-rate", "0"], "tx verify: error: --expansion-rate must be >= 1, got 0"),
    "--expansion-rate 2.5": (["--expansion-rate", "2.5"], "argument --expansion-rate: invalid int value: '2.5'"),
    "--kind hyper": (["--kind", "hyper"], "argument --kind: invalid choice: 'hyper'"),
    "--fracs 0": (["--fracs", "0"], "tx verify: error: --fracs must be >= 1, got 0"),
    "--fracs with mhc": (["--fracs", "2"], "tx verify: error: fracs > 1 works with kinds 'static', 'dynamic'"),
    "--kind mhc_lite n 6": (
        ["--kind", "mhc_lite", "--expansion-rate", "6"],
        "tx verify: error: kind 'mhc_lite' works for expansion_rate 1..5, got 6",
    ),
    "--connector-layers x": (
        ["--connector-layers", "0,x"],
        "tx verify: error: --connector-layers must be layer ids and ranges like 0,2,4-7, got '0,x' (bad part 'x')",
    ),
    "--connector-layers 3-1": (["--connector-layers", "3-1"], "(bad part '3-1')"),
    "--connector-layers without connector": (
        ["--expansion-rate", "1", "--connector-layers", "0"],
        "tx verify: error: --connector-layers needs a connector: set --expansion-rate > 1 or --fracs > 1",
    ),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    # checked before the model is read: the folder need not exist
    root = tmp_path_factory.mktemp("cli")
    cases = {k: ["verify", "--model", root / "no-model", *args] for k, (args, _) in CLI.items()}
    return run_tx_batch(cases | {"help": ["verify", "--help"]}, root)


@pytest.mark.parametrize("name", list(CLI))
def test_cli_bad_connector_flags(cli, name):
    proc = cli[name]
    assert proc.returncode == 2, proc.stderr
    assert CLI[name][1] in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_help_and_readme_name_the_connector_flags(cli):
    """`tx verify --help` and the README agree on the connector kinds and flags."""
    from pathlib import Path

    import tx.cli

    readme = (Path(tx.cli.__file__).parents[1] / "README.md").read_text()
    text = " ".join(cli["help"].stdout.split())
    for flag in ("--kind", "--fracs", "--connector-layers", "--expansion-rate"):
        assert flag in text and flag in readme, flag
    for kind in KINDS:
        assert kind in text and f"`{kind}`" in readme, kind
