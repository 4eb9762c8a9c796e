"""The `tx` command in subprocesses: every --help, one-line errors with exit code 2 for wrong arguments, and a tiny
successful finetune -> generate --adapter -> eval -> verify run on a checkpoint + tokenizer folder.

Each command is a subprocess. The help and error cases run in one subprocess (tests/cli_batch.py calls the same
``tx.cli.main`` that ``python -m tx`` calls, paying JAX's import once); a few of them also run as real
``python -m tx`` processes, which must give exactly the same output.
"""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from fixtures_run import ROOT, chat_records, model_folder, run_tx, run_tx_batch, tx_env, write_jsonl

import tx.cli

HELP = {
    (): ["demo", "verify", "finetune", "generate", "eval", "merge", "tx COMMAND --help"],
    ("finetune",): [
        "--model",
        "--data",
        "--eval-data",
        "--eval-fraction",
        "--lora-rank",
        "--lora-alpha",
        "--targets",
        "--lora-dropout",
        "--no-scan-layers",
        "--distributed",
        "--coordinator",
        "--num-processes",
        "--process-id",
        "--expansion-rate",
        "--kind",
        "--steps",
        "--batch-size",
        "--seq-len",
        "--lr",
        "--save-every",
        "--out",
        "--resume",
        "--overwrite",
        "--mesh",
    ],
    ("verify",): ["--model", "--lora-rank", "--expansion-rate", "--kind", "--tolerance", "--text"],
    ("generate",): ["--model", "--adapter", "--prompt", "--chat", "--max-new-tokens", "--temperature", "--top-p"],
    ("eval",): ["--model", "--adapter", "--data", "--seq-len", "--batch-size"],
    ("merge",): ["--model", "--adapter", "--out"],
    ("demo",): ["--model", "--steps", "--out", "--expansion-rate", "--kind"],
}


def real(cases: dict) -> dict:
    """name -> argv run as real ``python -m tx`` processes, all at once."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tx", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=tx_env(),
            cwd=ROOT,
        )
        for name, args in cases.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(cases[name], proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    return run_tx_batch(
        {cmd: [*cmd, "--help"] for cmd in HELP} | {"version": ["--version"], "none": []}, tmp_path_factory.mktemp("h")
    )


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda c: " ".join(c) or "tx")
def test_help(helps, cmd):
    proc = helps[cmd]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    missing = [flag for flag in HELP[cmd] if flag not in proc.stdout]
    assert not missing, f"tx {' '.join(cmd)} --help does not mention {missing}"


def test_version(helps):
    assert helps["version"].returncode == 0 and helps["version"].stdout.startswith("tx 0.")


def test_real_processes_match(helps, wrong):
    """`python -m tx` itself: the same help, the same one-line errors and exit codes as the batched runs."""
    procs = real(
        {
            "help": ["--help"],
            "finetune help": ["finetune", "--help"],
            "unknown flag": wrong["unknown flag"][0].args,
            "eval-data with eval-fraction": wrong["eval-data with eval-fraction"][0].args,
        }
    )
    for name, batched in [("help", helps[()]), ("finetune help", helps[("finetune",)])]:
        assert (procs[name].returncode, procs[name].stdout) == (0, batched.stdout)
    for name in ("unknown flag", "eval-data with eval-fraction"):
        batched = wrong[name][0]
        assert (procs[name].returncode, procs[name].stderr) == (2, batched.stderr), procs[name].stderr


# --------------------------------------------------------------------------------------- wrong arguments


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def wrong(folder, tmp_path_factory):
    """Every wrong invocation, run at once: name -> (CompletedProcess, what stderr must say)."""
    root = tmp_path_factory.mktemp("wrong")
    data = write_jsonl(root / "train.jsonl", chat_records(8))
    notrun = root / "notes"
    notrun.mkdir()
    (notrun / "mine.txt").write_text("a user's file")
    tok_only = root / "tok-only"
    tok_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"):
        shutil.copy(folder / name, tok_only / name)
    ft = ["finetune", "--model", folder, "--data", data, "--out", root / "run"]
    cases = {
        "unknown flag": (ft + ["--bogus"], "tx: error: unrecognized arguments: --bogus (see 'tx --help')"),
        "unknown command": (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        "missing --model": (
            ["finetune", "--data", data, "--out", root / "run"],
            "tx finetune: error: the following arguments are required: --model",
        ),
        "missing --data and --out": (
            ["finetune", "--model", folder],
            "the following arguments are required: --data, --out",
        ),
        "eval-data with eval-fraction": (
            ft + ["--eval-data", data, "--eval-fraction", "0.1"],
            "tx finetune: error: --eval-data and --eval-fraction conflict: give one of them",
        ),
        "resume with overwrite": (ft + ["--resume", "--overwrite"], "resume and overwrite conflict"),
        "lora-rank -1": (ft + ["--lora-rank", "-1"], "tx finetune: error: --lora-rank must be >= 0, got -1"),
        "lora-rank not an int": (ft + ["--lora-rank", "eight"], "argument --lora-rank: invalid int value: 'eight'"),
        "expansion-rate 0": (
            ft + ["--expansion-rate", "0"],
            "tx finetune: error: --expansion-rate must be >= 1, got 0",
        ),
        "nothing to train": (ft + ["--lora-rank", "0", "--expansion-rate", "1"], "nothing to train"),
        "steps 0": (ft + ["--steps", "0"], "TrainConfig.steps must be an integer >= 1, got 0"),
        "batch not divisible": (
            ft + ["--batch-size", "6", "--grad-accum", "4"],
            "batch_size (6) must be a multiple of grad_accum (4)",
        ),
        "bad dtype": (ft + ["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        "bad mesh": (ft + ["--mesh", "dp=8"], "bad mesh 'dp=8': expected axes like 'fsdp=4,tp=2'"),
        "coordinator alone": (
            ft + ["--coordinator", "127.0.0.1:1234", "--process-id", "0"],
            "tx finetune: error: --coordinator, --num-processes and --process-id go together: give all three or none",
        ),
        "process id out of range": (
            ft + ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in [0, --num-processes); got 2 with --num-processes 2",
        ),
        "missing data file": (
            ["finetune", "--model", folder, "--data", root / "nope.jsonl", "--out", root / "run"],
            f"tx finetune: error: data file {root / 'nope.jsonl'} does not exist",
        ),
        "missing eval data file": (
            ft + ["--eval-data", root / "nope.jsonl"],
            f"data file {root / 'nope.jsonl'} does not exist",
        ),
        "out is not a tx run": (
            ["finetune", "--model", folder, "--data", data, "--out", notrun],
            f"output folder {notrun} exists and is not a tx run; choose another --out or pass --overwrite",
        ),
        "model folder without config.json": (
            ["finetune", "--model", tok_only, "--data", data, "--out", root / "run"],
            f"tx finetune: error: {tok_only} has no config.json",
        ),
        "model folder missing": (
            ["verify", "--model", root / "no-such-model"],
            f"tx verify: error: no such folder: {root / 'no-such-model'}",
        ),
        "adapter folder missing": (
            ["generate", "--model", folder, "--adapter", root / "no-adapter", "--prompt", "hi"],
            f"tx generate: error: {root / 'no-adapter'} is not an adapter folder",
        ),
        "eval data missing": (
            ["eval", "--model", folder, "--data", root / "nope.jsonl"],
            f"tx eval: error: {root / 'nope.jsonl'}: no such file",
        ),
        "merge without adapter": (
            ["merge", "--model", folder, "--out", root / "merged"],
            "tx merge: error: merge needs --adapter DIR",
        ),
    }
    results = run_tx_batch({name: args for name, (args, _) in cases.items()}, root)
    assert not (root / "run").exists()  # no refused command created its output folder
    assert [p.name for p in notrun.iterdir()] == ["mine.txt"]
    return {name: (results[name], message) for name, (_, message) in cases.items()}


NAMES = [
    "unknown flag",
    "unknown command",
    "missing --model",
    "missing --data and --out",
    "eval-data with eval-fraction",
    "resume with overwrite",
    "lora-rank -1",
    "lora-rank not an int",
    "expansion-rate 0",
    "nothing to train",
    "steps 0",
    "batch not divisible",
    "bad dtype",
    "bad mesh",
    "coordinator alone",
    "process id out of range",
    "missing data file",
    "missing eval data file",
    "out is not a tx run",
    "model folder without config.json",
    "model folder missing",
    "adapter folder missing",
    "eval data missing",
    "merge without adapter",
]


@pytest.mark.parametrize("name", NAMES)
def test_wrong_arguments_one_line_exit_2(wrong, name):
    proc, message = wrong[name]
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert message in err, err


def test_every_wrong_case_is_tested(wrong):
    assert sorted(wrong) == sorted(NAMES)


def test_no_command_prints_help(helps):
    assert helps["none"].returncode == 2 and helps["none"].stdout == helps[()].stdout


# ---------------------------------------------------------------------------------- a tiny successful run


@pytest.fixture(scope="module")
def e2e(folder, tmp_path_factory):  # about 30 s on 2 CPU cores: five commands, each compiling its own functions
    """finetune (resumable, overwriting a non-run folder), then generate, eval and verify with what it wrote.

    The model folder also holds a malicious pickle and remote code: none of the commands may execute them.
    """
    from test_untrusted_files import plant_untrusted

    root = tmp_path_factory.mktemp("e2e")
    model = shutil.copytree(folder, root / "model")
    marker = plant_untrusted(model, root / "EXECUTED")
    data = write_jsonl(root / "train.jsonl", chat_records(24))
    out = root / "run"
    out.mkdir()
    (out / "stale.txt").write_text("not a tx run: refused without --overwrite")
    common = ["--lora-rank", "2", "--expansion-rate", "2", "--seq-len", "32", "--batch-size", "2"]
    procs = {
        "finetune": run_tx(
            "finetune", "--model", model, "--data", data, "--eval-fraction", "0.25", *common, "--steps", "3",
            "--save-every", "2", "--lr", "1e-2", "--out", out, "--overwrite",
        )
    }  # fmt: skip
    adapter = out / "adapter"
    eval_data = write_jsonl(root / "eval.jsonl", chat_records(4, seed=1))
    procs["generate"] = run_tx("generate", "--model", model, "--adapter", adapter, "--prompt", "reverse: a b", "--chat",
                               "--max-new-tokens", "4")  # fmt: skip
    procs["eval"] = run_tx("eval", "--model", model, "--adapter", adapter, "--data", eval_data, "--seq-len", "32")
    procs["verify"] = run_tx("verify", "--model", model, "--lora-rank", "2", "--expansion-rate", "2", "--kind", "mhc")
    procs["merge"] = run_tx("merge", "--model", model, "--adapter", adapter, "--out", root / "merged")
    return procs, out, marker


@pytest.mark.slow
def test_finetune(e2e):
    procs, out, marker = e2e
    proc = procs["finetune"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params:" in proc.stdout and "final train loss" in proc.stdout and "eval loss" in proc.stdout
    # --overwrite replaced the run's own files; a file tx did not write is left alone
    tensorboard = ["tensorboard"] if importlib.util.find_spec("tensorboardX") else []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter", "checkpoints", "metrics.jsonl", "stale.txt", "tx_run.json", *tensorboard]
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tx_connector.safetensors",
        "tx_connector_config.json",
    ]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3] and "eval_loss" in lines[-1]
    assert not marker.exists()


@pytest.mark.slow
def test_generate_with_adapter(e2e):
    proc = e2e[0]["generate"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.endswith("\n") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_eval_with_adapter(e2e):
    proc = e2e[0]["eval"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_loss"] > 0 and result["tokens"] > 0


@pytest.mark.slow
def test_verify(e2e):
    proc = e2e[0]["verify"]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "connector=mhc n=2" in proc.stdout


@pytest.mark.slow
def test_merge_refuses_a_connector_adapter(e2e):
    proc = e2e[0]["merge"]
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and "cannot save a model with a connector" in err
    assert not e2e[2].exists()


def test_final_train_loss_skips_steps_without_loss_tokens():
    # a batch of prompts only (documents longer than a row, split by packing) has loss 0 and 0 loss tokens
    history = [{"step": 1, "loss": 7.0, "loss_tokens": 32.0}, {"step": 2, "loss": 0.0, "loss_tokens": 0.0}]
    assert tx.cli.final_train_loss(history) == 7.0
    assert tx.cli.final_train_loss([{"step": 1, "loss": 0.0, "loss_tokens": 0.0}]) is None
