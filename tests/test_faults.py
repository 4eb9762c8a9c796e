"""Faults lose nothing: SIGKILL at random moments (during a step, during a checkpoint write, anywhere), and a full
disk while saving.

(a) ``tx finetune`` killed three times (inside a checkpoint write, right after a step, at a random moment) and
    resumed with ``--resume`` ends with the same adapters as an uninterrupted run (slow: five subprocesses).
(b) A writer that saves checkpoints, adapter files and metrics in a loop is killed at 24 random moments; after each
    kill the newest complete checkpoint loads with consistent values, no newer state is lost, no half-written file
    is visible under a final name, and the next writer resumes from it.
(c) A full disk (a real 2 MiB tmpfs where mounting is allowed, and ENOSPC injected) while saving a checkpoint, an
    adapter or metrics raises a WriteError naming the file and saying the disk is full; the previous checkpoint
    and adapter stay readable, no temporary file is left, and the run resumes once there is space.
"""

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_run import ROOT, chat_records, model_folder, run_tx, stub_steps, tx_env, write_jsonl
from flax import nnx
from safetensors.numpy import load_file

import tx
from tx.errors import TxError, WriteError
from tx.safetensors_io import SafetensorsFile
from tx.train.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from tx.train.trainer import TrainConfig, Trainer

TESTS = Path(__file__).parent

# ------------------------------------------------------------------------------- (b) kills during saves


@pytest.fixture()
def zygote():
    """tests/fault_writer.py: forks a checkpoint writer for each folder written to its stdin, prints its pid."""
    env = {**tx_env(), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "fault_writer.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=TESTS,
    )
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def writer_shapes():
    sys.path.insert(0, str(TESTS))
    from fault_writer import SHAPES

    return SHAPES


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"writer {pid} survived SIGKILL")


def check_run_folder(out: Path, previous: int) -> tuple[int, bool]:
    """Assert that nothing is lost or half-visible after a kill; returns (newest step, a write was cut short)."""
    root = out / "checkpoints"
    shapes = writer_shapes()
    for path in root.glob("step_*"):
        assert (path / "COMPLETE").is_file(), f"{path} is visible but incomplete"
    latest = latest_checkpoint(root)
    step = 0 if latest is None else int(latest.name.removeprefix("step_"))
    assert step >= previous, f"checkpoint step went back from {previous} to {step}: a checkpoint was lost"
    assert len(complete_checkpoints(root)) <= 3  # keep=2, plus one a kill may catch before the old one goes
    for path in complete_checkpoints(root):  # every tensor of a checkpoint is from its own step
        k = int(path.name.removeprefix("step_"))
        f = SafetensorsFile(path / "train_state.safetensors")
        try:
            assert all(np.all(np.asarray(f.get(key)) == k) for key in f.keys()), path
        finally:
            f.close()
    if latest is not None:  # and the newest loads the way Trainer.restore loads it
        states = {n: nnx.State({k: nnx.Param(jnp.zeros(s)) for k, s in p.items()}) for n, p in shapes.items()}
        moments = {n: {k: jnp.zeros(s) for k, s in p.items()} for n, p in shapes.items()}
        opt = {"count": jnp.zeros((), jnp.int32), "mu": moments, "nu": moments}
        new_opt, info = load_checkpoint(latest, states, opt)
        assert info["step"] == step and int(new_opt["count"]) == step and new_opt["count"].shape == ()
        assert all(np.all(np.asarray(v[...]) == step) for s in states.values() for _, v in nnx.to_flat_state(s))
    cut = bool(list(root.glob(".tmp-*")))
    adapter = out / "adapter"
    if adapter.exists():  # the old folder or the new one, never a torn file nor new weights beside an old config
        assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        w = load_file(adapter / "adapter_model.safetensors")["w"]
        assert np.all(w == w.flat[0]) and w.flat[0] >= 1
        assert json.loads((adapter / "adapter_config.json").read_text())["step"] == w.flat[0]
    cut |= bool(list(out.glob(".adapter.*")))
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().split("\n")
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                assert i == len(lines) - 1, f"metrics line {i + 1} is damaged and is not the last line"
                cut |= line != ""
        # what a resume keeps: exactly one line per step up to the checkpoint
        assert [r["step"] for r in records if r["step"] <= step] == list(range(1, step + 1))
    return step, cut


def test_kill_during_saves_loses_nothing(zygote, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(7)
    step, cut, kills = 0, 0, 24
    for _ in range(kills):
        zygote.stdin.write(f"{out}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
        time.sleep(rng.uniform(0.0, 0.25))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"writer {pid} ended by itself (see its traceback above)")
        wait_gone(pid)
        step, was_cut = check_run_folder(out, step)
        cut += was_cut
    print(f"{kills} kills: {cut} inside a write; newest checkpoint after the last kill: step {step}")
    assert step >= 5, f"only {step} checkpoints in {kills} runs: the writer made no progress"
    assert cut >= 3, f"only {cut} of {kills} kills landed inside a write; the test would not test much"
    # a last writer resumes and cleans up what killed writers left behind
    zygote.stdin.write(f"{out}\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    deadline = time.monotonic() + 60
    while latest_checkpoint(out / "checkpoints").name <= f"step_{step + 1:07d}" and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    final, _ = check_run_folder(out, step)
    assert final > step + 1
    leftovers = [p.name for p in (out / "checkpoints").glob(".tmp-*")]
    assert len(leftovers) <= 1, leftovers  # at most the one the last kill interrupted
    leftovers = [p.name for p in out.glob(".adapter.*")]
    assert len(leftovers) <= 1, leftovers


def dead_owner() -> str:
    """The ``host.pid`` suffix of a writer that has died (a child that has exited and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}.{int(child.stdout)}"


def two_files(step: int):
    def write(dest: Path) -> None:
        (dest / "a.json").write_text(json.dumps({"step": step}))
        (dest / "b.json").write_text(json.dumps({"step": step}))

    return write


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_write_folder_swaps_the_whole_folder_and_keeps_other_files(monkeypatch, tmp_path, exchange):
    import tx.folder_io

    if exchange == "two renames":  # where the OS or file system has no atomic exchange
        monkeypatch.setattr(tx.folder_io, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    tx.folder_io.write_folder(folder, two_files(1), replaces=["a.json", "b.json", "c.json"])
    (folder / "README.md").write_text("mine")
    (folder / "c.json").write_text("from an earlier save")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    tx.folder_io.write_folder(folder, two_files(2), replaces=["a.json", "b.json", "c.json"])
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "a.json", "b.json", "tokenizer"]  # c.json was the save's own, and is gone
    assert (folder / "README.md").read_text() == "mine" and (folder / "tokenizer" / "vocab.json").is_file()
    assert json.loads((folder / "b.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no hidden folder left


def test_write_folder_recovers_what_a_killed_writer_left(tmp_path):
    from tx.folder_io import write_folder

    folder = tmp_path / "adapter"
    write_folder(folder, two_files(1))
    dead = dead_owner()
    os.rename(folder, tmp_path / f".adapter.old-{dead}")  # killed between the fallback's two renames
    (tmp_path / f".adapter.tmp-{dead}").mkdir()  # and a half-written new folder
    (tmp_path / f".adapter.tmp-{dead}" / "a.json").write_text("torn")
    live = tmp_path / ".adapter.tmp-otherhost.1"  # another host's writer: not ours to remove
    live.mkdir()

    def fails(dest: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "a.json"))

    with pytest.raises(WriteError, match=rf"cannot write {folder}/a.json: the disk is full"):
        write_folder(folder, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.tmp-otherhost.1", "adapter"]
    assert json.loads((folder / "a.json").read_text()) == {"step": 1}  # the old adapter is back, unchanged


def test_write_folder_in_place_where_the_folder_is_a_mount_point(monkeypatch, tmp_path):
    import tx.folder_io

    folder = tmp_path / "adapter"
    tx.folder_io.write_folder(folder, two_files(1))

    def busy(a, b):
        raise OSError(errno.EBUSY, "Device or resource busy", str(b))

    monkeypatch.setattr(tx.folder_io, "_exchange", busy)
    (folder / "c.json").write_text("from an earlier save")
    calls = []
    write = lambda dest: (calls.append(dest), two_files(2)(dest))  # noqa: E731
    tx.folder_io.write_folder(folder, write, replaces=["a.json", "b.json", "c.json"])
    assert len(calls) == 1  # written once (into the hidden copy), then copied in: write may be a collective
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the hidden copy is gone
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.json"]  # c.json was not rewritten: removed
    assert [json.loads((folder / n).read_text())["step"] for n in ("a.json", "b.json")] == [2, 2]


def test_write_folder_in_place_where_no_sibling_can_be_made(monkeypatch, tmp_path):
    import tx.adapters.io
    import tx.folder_io

    folder = tmp_path / "adapter"
    tx.folder_io.write_folder(folder, two_files(1))
    (folder / "c.json").write_text("from an earlier save")
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".adapter.tmp-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    write = lambda dest: tx.adapters.io._write_json(dest / "a.json", {"step": 2})  # noqa: E731
    tx.folder_io.write_folder(folder, write, replaces=["a.json", "b.json", "c.json"])
    assert sorted(p.name for p in folder.iterdir()) == ["a.json"]  # b and c were not rewritten: removed
    assert json.loads((folder / "a.json").read_text()) == {"step": 2}


# ----------------------------------------------------------------------------------------- (c) full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({proc.stderr.strip()}); the injected-ENOSPC tests still run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk up to ``leave`` free bytes with a filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        chunk = b"\0" * 65536
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def numpy_states(value: float, size: int):
    states = {"lora": nnx.State({"a": nnx.Param(np.full((size,), value, np.float32))})}
    return states, {"count": np.asarray(int(value), np.int32), "mu": np.full((size,), value, np.float32)}


def assert_disk_full(err: pytest.ExceptionInfo, where: Path):
    assert isinstance(err.value, TxError) and isinstance(err.value, OSError)
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert message.startswith(f"cannot write {where}") and "the disk is full" in message, message


def test_checkpoint_on_a_full_disk(small_disk):
    root = small_disk / "checkpoints"
    save_checkpoint(root, 1, *numpy_states(1, 50_000), info={})  # 400 kB
    with pytest.raises(WriteError) as err:
        save_checkpoint(root, 2, *numpy_states(2, 250_000), info={})  # 2 MB more: does not fit
    assert_disk_full(err, root)
    assert "train_state.safetensors" in str(err.value)
    assert [p.name for p in root.iterdir()] == ["step_0000001"]  # the partial checkpoint is gone, space freed
    states = {"lora": nnx.State({"a": nnx.Param(jnp.zeros(50_000))})}
    opt, info = load_checkpoint(
        root / "step_0000001", states, {"count": jnp.zeros((), jnp.int32), "mu": jnp.zeros(50_000)}
    )
    assert info["step"] == 1 and float(states["lora"]["a"][...].min()) == 1.0
    save_checkpoint(root, 2, *numpy_states(2, 100_000), info={})  # fits once step 1's space is reused
    assert latest_checkpoint(root).name == "step_0000002"


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    return tx.attach(tx.load_model(model_folder(tmp_path_factory)), lora=tx.LoRAConfig(rank=2, alpha=4))


def test_adapter_on_a_full_disk(small_disk, lora_model, tmp_path_factory):
    folder = small_disk / "adapter"
    tx.save_adapter(lora_model, folder)
    before = load_file(folder / "adapter_model.safetensors")
    filler = fill(small_disk, leave=4096)
    b = lora_model.layers.attn.q_proj.lora_b
    old = b[...]
    b.set_value(old + 1.0)
    try:
        with pytest.raises(WriteError) as err:
            tx.save_adapter(lora_model, folder)
    finally:
        b.set_value(old)
    assert_disk_full(err, folder / "adapter_model.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    after = load_file(folder / "adapter_model.safetensors")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    fresh = tx.load_adapter(tx.load_model(model_folder(tmp_path_factory)), folder)  # still loads
    assert fresh.lora_config.rank == 2
    filler.unlink()
    tx.save_adapter(lora_model, folder)


def test_cli_on_a_full_disk(small_disk, tmp_path_factory, tmp_path):
    folder = model_folder(tmp_path_factory)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    (small_disk / "run").mkdir()
    fill(small_disk)
    proc = run_tx("finetune", "--model", folder, "--data", data, "--out", small_disk / "run", "--steps", "2")
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cannot write {small_disk / 'run' / 'tx_run.json'}: the disk is full" in err


class _SaveFileFails:
    """Stands in for safetensors.numpy.save_file: fails with safetensors' own ENOSPC error from call ``n`` on."""

    def __init__(self, n: int):
        import safetensors.numpy

        self.real, self.n, self.calls = safetensors.numpy.save_file, n, 0

    def __call__(self, tensors, filename, metadata=None):
        self.calls += 1
        if self.calls >= self.n:
            from safetensors import SafetensorError

            Path(filename).write_bytes(b"partial")  # a half-written temporary file
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return self.real(tensors, filename, metadata=metadata)


def test_injected_enospc_in_checkpoint_files(monkeypatch, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, *numpy_states(1, 10), info={})
    monkeypatch.setattr("safetensors.numpy.save_file", _SaveFileFails(1))
    with pytest.raises(WriteError) as err:
        save_checkpoint(root, 2, *numpy_states(2, 10), info={})
    assert_disk_full(err, root)
    monkeypatch.undo()

    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".state.json.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(WriteError) as err:
        save_checkpoint(root, 2, *numpy_states(2, 10), info={})
    assert_disk_full(err, root)
    owner = f"{socket.gethostname()}.{os.getpid()}"
    assert str(err.value).startswith(f"cannot write {root}/.tmp-step_0000002-{owner}/state.json")
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["step_0000001"]


def test_save_model_failing_midway_keeps_the_earlier_export_whole(monkeypatch, lora_model, tmp_path):
    """An export is several shards, an index and config.json: one that fails midway (disk full on the shard after
    the first one LoRA changes) leaves the earlier export exactly as it was (the old writer had already replaced
    the shards before: a mix of two models), names the shard under the export folder, and leaves no hidden
    folder; the next export succeeds."""
    folder = tmp_path / "merged"
    tx.save_model(lora_model, folder, max_shard_size="40KB")
    (folder / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    shards = sorted(n for n in before if n.startswith("model-"))
    key = "model.layers.0.self_attn.q_proj.weight"  # LoRA changes it: the shard holding it is rewritten first
    at = shards.index(json.loads(before["model.safetensors.index.json"])["weight_map"][key])
    assert at + 1 < len(shards), (at, shards)
    b = lora_model.layers.attn.q_proj.lora_b
    old = b[...]
    b.set_value(old + 1.0)  # a different merged model
    try:
        monkeypatch.setattr("safetensors.numpy.save_file", _SaveFileFails(at + 2))  # the shard after it fails
        with pytest.raises(WriteError) as err:
            tx.save_model(lora_model, folder, max_shard_size="40KB")
        assert_disk_full(err, folder / shards[at + 1])
        monkeypatch.undo()
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
        tx.save_model(lora_model, folder)  # one file now: the shards and the index go, the README stays
    finally:
        b.set_value(old)
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "config.json", "model.safetensors"} <= names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")], sorted(names)
    from safetensors.numpy import load as load_bytes

    old_q = load_bytes(before[shards[at]])[key]
    new_q = load_file(folder / "model.safetensors")[key]  # the second model's (lora_b + 1 folded in)
    assert old_q.shape == new_q.shape and np.abs(new_q - old_q).max() > 1e-3


def test_other_write_errors_name_the_file(monkeypatch, tmp_path):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path}/a.json: Permission denied") as err:
        from tx.adapters.io import _write_json

        _write_json(tmp_path / "a.json", {})
    assert err.value.errno == errno.EACCES and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    folder = model_folder(tmp_path_factory)
    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_records(16))
    return folder, data, tx.load_tokenizer(folder)


def new_trainer(folder, out, **config):
    model = tx.attach(tx.load_model(folder), lora=tx.LoRAConfig(rank=2, alpha=4))
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, save_every=2, progress=False, out=str(out), **config)
    return stub_steps(Trainer(model, cfg))


def test_fit_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(monkeypatch, run_inputs, tmp_path):
    folder, data, tok = run_inputs
    out = tmp_path / "run"
    monkeypatch.setattr("safetensors.numpy.save_file", _SaveFileFails(2))  # the step-4 checkpoint fails
    with pytest.raises(WriteError) as err:
        new_trainer(folder, out).fit(data, tokenizer=tok)
    assert_disk_full(err, out / "checkpoints")
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]
    resumed = new_trainer(folder, out, resume=True)
    resumed.fit(data, tokenizer=tok)
    assert resumed.step_count == 6 and (out / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_metrics_on_a_full_disk(monkeypatch, run_inputs, tmp_path):
    folder, data, tok = run_inputs
    import tx.train.trainer as trainer_module

    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "open", full_open, raising=False)
    with pytest.raises(WriteError) as err:
        new_trainer(folder, tmp_path / "run").fit(data, tokenizer=tok)
    assert_disk_full(err, tmp_path / "run" / "metrics.jsonl")


# ---------------------------------------------------------------------- (a) kill tx finetune, then --resume


def finetune_args(folder, data, out):
    return [
        "finetune", "--model", folder, "--data", data, "--out", out, "--lora-rank", "2", "--expansion-rate", "2",
        "--kind", "mhc", "--steps", "6", "--save-every", "2", "--batch-size", "2", "--seq-len", "32",
        "--lr", "1e-2", "--seed", "3",
    ]  # fmt: skip


def train(kill, args, cache, delay=None):
    """Run fault_train.py (tx finetune that SIGKILLs itself at ``kill``), or kill it after ``delay`` seconds."""
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "fault_train.py"), kill, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tx_env(cache),
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=delay if delay is not None else 300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path_factory, tmp_path):
    folder = model_folder(tmp_path_factory)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(24))
    cache = tmp_path / "xla-cache"
    full, part = tmp_path / "full", tmp_path / "part"
    rc, _, err = train("none", finetune_args(folder, data, full), cache)
    assert rc == 0, err[-3000:]

    args = finetune_args(folder, data, part)
    rc, _, err = train("save:2", args, cache)  # inside the step-4 checkpoint write
    assert rc == -signal.SIGKILL, err[-3000:]
    assert [p.name for p in (part / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_0000002"]
    assert list((part / "checkpoints").glob(".tmp-step_0000004-*"))  # the cut write's temporary folder
    rc, _, err = train("step:5", [*args, "--resume"], cache)  # right after step 5 ran, before anything is saved
    assert rc == -signal.SIGKILL, err[-3000:]
    assert latest_checkpoint(part / "checkpoints").name == "step_0000004"
    delay = random.Random(11).uniform(2.0, 6.0)  # somewhere in start-up, load, compile or the last steps
    rc, _, err = train("none", [*args, "--resume"], cache, delay=delay)
    assert rc in (0, -signal.SIGKILL), err[-3000:]
    rc, _, err = train("none", [*args, "--resume"], cache)
    assert rc == 0, err[-3000:]

    for name in ("adapter_model.safetensors", "tx_connector.safetensors"):
        a, b = load_file(full / "adapter" / name), load_file(part / "adapter" / name)
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=f"{name}: {key}")
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list((part / "checkpoints").glob(".tmp-*"))  # the resumed runs cleaned up after the killed ones
    shutil.rmtree(cache, ignore_errors=True)
