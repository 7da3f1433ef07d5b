"""Checkpoint integrity: damaged checkpoints are found on load, on `--resume auto` and before rotation deletes older
ones; a full disk keeps the previous checkpoint; killed exports leave no temp directories behind for good."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script

from lit_gpt.checkpoint.find import latest_checkpoint, list_checkpoints, verify_checkpoint
from lit_gpt.checkpoint.layout import CHECKSUM_FILE, CheckpointError, DamagedError, SaveError
from lit_gpt.checkpoint.load import load_training_state, load_weights
from lit_gpt.checkpoint.publish import atomic_output_dir
from lit_gpt.checkpoint.save import save_checkpoint
from lit_gpt.errors import InputError
from lit_gpt.resume import resume_checkpoint
from lit_gpt.run_dir import RunDir

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP saves, on purpose


def trained(seed: int = 0):
    """A small model and AdamW after one step (so that exp_avg_sq exists)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 32)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def save(out: Path, step: int, kind: str = "full", keep_last: int = 0, seed: int = 0) -> Path:
    model, optimizer = trained(seed)
    path = RunDir(out).checkpoint(step)
    save_checkpoint(path, model, optimizer, {"step_count": step}, kind, keep_last=keep_last)
    return path


def exp_avg_sq(model, optimizer) -> torch.Tensor:
    return optimizer.state[next(iter(model.parameters()))]["exp_avg_sq"]


def flip_bytes(path: Path, offset: int, count: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))


def record_offset(path: Path, content: bytes) -> int:
    """File offset of the zip record holding exactly `content` (found by value, independently of our reader)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if archive.read(info) == content:
                offset = raw.index(content, info.header_offset)
                return offset
    raise AssertionError("no record holds these bytes")


def messages() -> tuple[list[str], callable]:
    logged: list[str] = []
    return logged, logged.append


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# ------------------------------------------------------------------ damaged checkpoints
def test_flipped_bytes_in_a_full_checkpoint_are_one_clear_error(tmp_path):
    path = save(tmp_path, 2)
    model, optimizer = trained()
    good = exp_avg_sq(model, optimizer).clone()
    flip_bytes(path, record_offset(path, good.numpy().tobytes()) + 40)
    # torch.load does not notice: the damaged optimizer state loads silently (the defect of the issue).
    silently = torch.load(path, weights_only=True)["optimizer"]["state"]["0.weight"]["exp_avg_sq"]
    assert not torch.equal(silently, good)
    with pytest.raises(DamagedError) as info:
        load_training_state(path, *trained(1))
    message = str(info.value)
    assert message.startswith(f"{path}: damaged: record ") and "CRC-32" in message


def test_flipped_bytes_in_a_sharded_checkpoint_are_one_clear_error(tmp_path):
    path = save(tmp_path, 2, "sharded")
    shard = next(path.glob("*.distcp"))
    flip_bytes(shard, shard.stat().st_size // 2)
    with pytest.raises(DamagedError, match=f"^{shard}: damaged .*{CHECKSUM_FILE}"):
        load_training_state(path, *trained(1))
    (path / CHECKSUM_FILE).unlink()  # as written before checksums existed: loads, unverified
    assert verify_checkpoint(path) is False


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_latest_checkpoint_passes_over_a_damaged_newest_one(tmp_path, kind):
    for step in (1, 2, 3):
        save(tmp_path, step, kind)
    newest = RunDir(tmp_path).checkpoint(3)
    damaged_file = next(newest.glob("*.distcp")) if kind == "sharded" else newest
    flip_bytes(damaged_file, damaged_file.stat().st_size // 2)
    logged, log = messages()
    assert latest_checkpoint(tmp_path, log=log) == RunDir(tmp_path).checkpoint(2)
    assert len(logged) == 1 and logged[0].startswith("warning: ") and str(damaged_file) in logged[0]
    assert latest_checkpoint(tmp_path, verify=False) == newest  # unchecked: what a fresh run refuses to mix with
    model, optimizer = trained(1)
    assert load_training_state(RunDir(tmp_path).checkpoint(2), model, optimizer) == {"step_count": 2}
    assert torch.equal(exp_avg_sq(model, optimizer), exp_avg_sq(*trained(0)))


def rename_record_in_central_directory(path: Path, name: str, new_name: str) -> None:
    """Change one record's name where the zip's central directory lists it; every CRC-32 still matches."""
    raw = bytearray(path.read_bytes())
    at = raw.rfind(name.encode())  # the central directory follows all local headers
    assert at > 0 and len(name) == len(new_name)
    raw[at:at + len(name)] = new_name.encode()
    path.write_bytes(bytes(raw))


def test_a_record_missing_from_the_archive_is_damage(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    newest = RunDir(tmp_path).checkpoint(2)
    with zipfile.ZipFile(newest) as archive:
        record = next(n for n in archive.namelist() if n.endswith("/data/0"))
    rename_record_in_central_directory(newest, record, record[:-1] + "Z")
    with zipfile.ZipFile(newest) as archive:  # a readable archive, without that record
        assert record not in archive.namelist()
    with pytest.raises(DamagedError, match=f"^{newest}: damaged: record {record} is missing"):
        verify_checkpoint(newest)
    logged, log = messages()
    assert latest_checkpoint(tmp_path, log=log) == RunDir(tmp_path).checkpoint(1)
    assert len(logged) == 1 and logged[0].startswith("warning: passing over") and str(newest) in logged[0]
    with pytest.raises(InputError, match=f"^--resume: {newest}: damaged: record {record} is missing"):
        resume_checkpoint(str(newest), tmp_path)


def test_rotation_never_deletes_the_newest_good_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1, keep_last=1)
    real_save = torch.save

    def save_then_damage(obj, f, *args, **kwargs):  # the bytes on disk are not the ones written
        real_save(obj, f, *args, **kwargs)
        flip_bytes(Path(f), Path(f).stat().st_size // 2)

    monkeypatch.setattr(torch, "save", save_then_damage)
    save(tmp_path, 2, keep_last=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter-00000001-ckpt.pth", "iter-00000002-ckpt.pth"]
    assert latest_checkpoint(tmp_path, log=lambda m: None) == RunDir(tmp_path).checkpoint(1)
    save(tmp_path, 3, keep_last=1)  # a good one: now the older ones can go
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter-00000003-ckpt.pth"]


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    model, optimizer = trained()
    full = RunDir(tmp_path).checkpoint(1)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step_count": 1}, full)
    assert verify_checkpoint(full) is True  # every torch.save archive carries CRCs: verifiable after the fact
    sharded = save(tmp_path / "old", 1, "sharded")
    (sharded / CHECKSUM_FILE).unlink()
    logged, log = messages()
    assert latest_checkpoint(tmp_path / "old", log=log) == sharded
    assert logged == [f"note: {sharded} has no checksums (written before they were recorded); it is used unverified"]
    assert load_training_state(sharded, *trained(1)) == {"step_count": 1}


def test_a_sharded_checkpoint_without_checksums_needs_allow_unverified(tmp_path):
    older, newest = save(tmp_path, 1, "sharded"), save(tmp_path, 2, "sharded")
    (newest / CHECKSUM_FILE).unlink()
    with pytest.raises(InputError) as refused:
        resume_checkpoint(str(newest), tmp_path)
    assert str(refused.value) == (f"--resume: {newest}: has no {CHECKSUM_FILE} to verify its bytes against (written "
                                  f"by an older version, or the file was removed); pass --allow_unverified to use "
                                  f"it unverified")
    assert resume_checkpoint(str(newest), tmp_path, allow_unverified=True) == newest
    logged, log = messages()
    assert latest_checkpoint(tmp_path, log=log, allow_unverified=False) == older
    assert logged == [f"warning: passing over {newest}: has no {CHECKSUM_FILE} to verify its bytes against (written "
                      f"by an older version, or the file was removed); pass --allow_unverified to use it unverified"]
    assert resume_checkpoint("auto", tmp_path) == older
    assert resume_checkpoint("auto", tmp_path, allow_unverified=True) == newest


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_sharded_checkpoint_without_checksums_is_checked_against_its_metadata(tmp_path, damage):
    older, newest = save(tmp_path, 1, "sharded"), save(tmp_path, 2, "sharded")
    (newest / CHECKSUM_FILE).unlink()
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if damage == "truncated":
        os.truncate(shard, shard.stat().st_size - 1)
    else:
        shard.unlink()
    with pytest.raises(DamagedError, match=f"^{shard}: {damage}"):
        verify_checkpoint(newest, allow_unverified=True)
    logged, log = messages()
    assert latest_checkpoint(tmp_path, log=log, allow_unverified=True) == older
    assert len(logged) == 1 and logged[0].startswith(f"warning: passing over a damaged checkpoint: {shard}: {damage}")


def test_export_and_generation_refuse_a_damaged_checkpoint(tmp_path):
    path = save(tmp_path, 2)
    assert load_weights(path)["verified"] is True
    flip_bytes(path, record_offset(path, trained()[0][0].weight.detach().numpy().tobytes()) + 8)
    with pytest.raises(CheckpointError, match=f"^{path}: damaged: record "):
        load_weights(path)


def test_checksum_file_is_sha256sum_compatible(tmp_path):
    path = save(tmp_path, 1, "sharded")
    listed = sorted(line.split("  ")[1] for line in (path / CHECKSUM_FILE).read_text().splitlines())
    assert listed == sorted(p.name for p in path.iterdir() if p.name != CHECKSUM_FILE)
    check = subprocess.run(["sha256sum", "--check", "--quiet", CHECKSUM_FILE], cwd=path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------------------------------ a full disk
def test_no_space_left_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    previous = save(tmp_path, 2)
    before = previous.read_bytes()

    def fill_the_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(SaveError) as info:
        save(tmp_path, 4, keep_last=1)
    path = RunDir(tmp_path).checkpoint(4)
    assert str(info.value).startswith(f"{path}: cannot save the checkpoint: no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name]  # no partial file, nothing rotated away
    assert previous.read_bytes() == before


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 3 MiB file system (needs root and mount); skipped where it cannot be had."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a failed test may hold a file open


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_really_full_disk(small_tmpfs, kind):
    first = save(small_tmpfs, 1, kind)  # small
    model = torch.nn.Linear(256, 1024)  # 1 MiB of weights, 3 MiB with AdamW's state: more than the disk has left
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    with pytest.raises(SaveError, match="no space left on device"):
        save_checkpoint(RunDir(small_tmpfs).checkpoint(2), model, optimizer, {"step_count": 2}, kind)
    assert [p.name for p in small_tmpfs.iterdir()] == [first.name]
    assert verify_checkpoint(first) is True


# ------------------------------------------------------------------ several ranks agree
AGREEMENT_SCRIPT = r"""
import errno, os, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from pathlib import Path
from lightning.fabric import Fabric
from lit_gpt.checkpoint.find import latest_checkpoint
from lit_gpt.checkpoint.layout import DamagedError, SaveError
from lit_gpt.checkpoint.load import load_training_state
from lit_gpt.checkpoint.save import save_checkpoint
from lit_gpt.distributed import make_strategy
from lit_gpt.run_dir import RunDir

out = Path(sys.argv[1])
fabric = Fabric(accelerator="cpu", devices=2, strategy=make_strategy("fsdp", world_size=2))
fabric.launch()
rank = fabric.global_rank
model = fabric.setup_module(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)))
optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
fabric.backward(model(torch.randn(4, 32)).square().sum())
optimizer.step()
for step in (1, 2):
    save_checkpoint(RunDir(out).checkpoint(step), model, optimizer, {{"step": step}}, "sharded")
newest = RunDir(out).checkpoint(2)
names = sorted(p.name for p in newest.iterdir())
if rank == 0:
    shard = newest / "__1_0.distcp"  # written and hashed by rank 1
    data = bytearray(shard.read_bytes())
    data[100:116] = bytes(b ^ 0x5A for b in data[100:116])
    shard.write_bytes(bytes(data))
fabric.barrier()
print(f"rank {{rank}} shards {{names}}")
print(f"rank {{rank}} latest {{latest_checkpoint(out, log=lambda m: None).name}}")
try:
    load_training_state(newest, model, optimizer)
except DamagedError as e:
    print(f"rank {{rank}} damaged {{Path(str(e).split(':')[0]).name}}")
real_save = torch.save
def full_disk_on_rank_0(obj, f, *a, **k):
    if rank == 0 and "meta.pt" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real_save(obj, f, *a, **k)
torch.save = full_disk_on_rank_0
try:
    save_checkpoint(RunDir(out).checkpoint(3), model, optimizer, {{"step": 3}}, "sharded")
except SaveError as e:
    print(f"rank {{rank}} save failed: {{'no space left on device' in str(e)}}")
fabric.barrier()
print(f"rank {{rank}} left {{sorted(p.name for p in out.iterdir())}}")
"""


@pytest.mark.slow
def test_ranks_agree_on_damage_and_failed_saves(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    out = run_script(str(script), str(tmp_path / "run"), timeout=300).stdout
    for rank in (0, 1):
        assert f"rank {rank} shards ['.metadata', '__0_0.distcp', '__1_0.distcp', '{CHECKSUM_FILE}', 'meta.pt']" in out
        assert f"rank {rank} latest iter-00000001-ckpt.pth" in out, out
        assert f"rank {rank} damaged __1_0.distcp" in out, out
        assert f"rank {rank} save failed: True" in out, out
        assert f"rank {rank} left ['iter-00000001-ckpt.pth', 'iter-00000002-ckpt.pth']" in out, out


# ------------------------------------------------------------------ the trainer
@pytest.mark.slow
def test_resume_auto_skips_a_damaged_checkpoint_and_continues_exactly(prepared_data, tmp_path):
    from test_trainer import train, train_losses

    train(prepared_data, tmp_path, max_steps=4, save_interval=2)
    reference = train_losses(tmp_path)
    damaged = tmp_path / "iter-00000004-ckpt.pth"
    flip_bytes(damaged, damaged.stat().st_size // 2)

    named = train(prepared_data, tmp_path, check=False, max_steps=4, save_interval=2, resume=damaged)
    errors = [line for line in named.stderr.splitlines() if line.startswith("error:")]
    assert named.returncode == 2 and len(errors) == 1, named.stderr[-2000:]
    assert errors[0].startswith(f"error: --resume: {damaged}: damaged") and "Traceback" not in named.stderr

    out = train(prepared_data, tmp_path, max_steps=4, save_interval=2, resume="auto")
    assert f"warning: passing over a damaged checkpoint: {damaged}: damaged" in out.stderr
    assert f"Resumed from {tmp_path / 'iter-00000002-ckpt.pth'}" in out.stdout
    assert train_losses(tmp_path) == reference  # steps 3 and 4 again, bitwise
    assert verify_checkpoint(damaged) is True  # the new step-4 checkpoint; the damaged one was set aside


@pytest.mark.slow
def test_trainer_reports_a_full_disk_and_keeps_the_previous_checkpoint(prepared_data, tmp_path):
    from test_trainer import trainer_args

    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(
        "import errno, os, runpy, sys, torch\n"
        "real_save = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if 'iter-00000004' in str(f):\n"
        "        open(f, 'wb').write(b'partial')\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))\n"
        "    return real_save(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    run = tmp_path / "run"
    result = run_script(str(wrapper), *trainer_args(prepared_data, run, max_steps=6, save_interval=2), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and "iter-00000004-ckpt.pth" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run.glob("iter-*")) == ["iter-00000002-ckpt.pth"]
    assert verify_checkpoint(run / "iter-00000002-ckpt.pth") is True


# ------------------------------------------------------------------ export temp dirs
def test_temp_dirs_of_killed_exports_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "hf"
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys\n"
         f"sys.path.insert(0, {str(ROOT)!r})\n"
         "from lit_gpt.checkpoint.publish import atomic_output_dir\n"
         f"with atomic_output_dir({str(out)!r}, overwrite=False) as tmp:\n"
         "    (tmp / 'model.safetensors').write_bytes(bytes(1 << 20))\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    [stale] = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    host = socket.gethostname()
    alive = tmp_path / f".other.tmp-{host}-{os.getpid()}-abc123"  # a running export (this process)
    elsewhere = tmp_path / f".other.tmp-another-host-{dead_pid()}-abc123"  # its pids mean nothing here
    for d in (alive, elsewhere):
        d.mkdir()
    with atomic_output_dir(out, overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and alive.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_an_export_killed_while_swapping_gets_its_old_directory_back(tmp_path):
    out = tmp_path / "hf"
    aside = tmp_path / f".hf.old-{socket.gethostname()}-{dead_pid()}-x1y2z3"
    (aside / "replaced").mkdir(parents=True)
    (aside / "replaced" / "config.json").write_text('{"old": true}')  # moved aside; the new one never arrived
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        with atomic_output_dir(out, overwrite=False):
            pass
    assert (out / "config.json").read_text() == '{"old": true}' and not aside.exists()


@pytest.mark.parametrize("renames_done", [1, 2])
def test_an_overwrite_killed_between_its_renames_ends_with_the_complete_new_export(tmp_path, renames_done):
    """SIGKILL right after the switch's first or second rename: the next run finishes the switch."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old export")
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys\n"
         "from pathlib import Path\n"
         f"sys.path.insert(0, {str(ROOT)!r})\n"
         "from lit_gpt.checkpoint.publish import atomic_output_dir\n"
         "rename, done = Path.rename, []\n"
         "def killing_rename(self, target):\n"
         "    moved = rename(self, target)\n"
         "    done.append(target)\n"
         f"    if len(done) == {renames_done}:\n"
         "        os.kill(os.getpid(), signal.SIGKILL)\n"
         "    return moved\n"
         f"with atomic_output_dir({str(out)!r}, overwrite=True) as tmp:\n"
         "    (tmp / 'config.json').write_text('new export')\n"
         "    Path.rename = killing_rename\n"], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(CheckpointError, match="exists and is not empty"):  # the next run, without --overwrite
        with atomic_output_dir(out, overwrite=False):
            pass
    assert (out / "config.json").read_text() == "new export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_to_a_full_disk_is_one_clear_error(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("the previous export")
    with pytest.raises(CheckpointError, match=f"--out_dir {out}: no space left on device"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "config.json").read_text() == "the previous export"
