"""Unit tests of checkpoint.py: the output-directory lock on a file system without locks, reading back the logs
of a killed run, and the finite-weights check before a checkpoint (ZeRO-3 partitions).

Run: python -m pytest tests/test_checkpoint.py -q
"""

import json

import torch


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    import checkpoint

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    lock = checkpoint.releases_output_locks(checkpoint.lock_output_dir)  # held only during the call
    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock(tmp_path / "run")
    assert "cannot lock files" in capsys.readouterr().out
    monkeypatch.undo()
    lock(tmp_path / "run")
    assert "cannot lock files" not in capsys.readouterr().out


def test_reading_back_the_logs_of_a_killed_run_keeps_whole_records_before_the_step(tmp_path):
    """A kill can tear the last line of samples.jsonl inside a multi-byte character; a garbled line may hold
    JSON that is not a record. Neither stops the resume."""
    from checkpoint import read_jsonl_before

    path = tmp_path / "samples.jsonl"
    records = [{"step": 0, "response": "é"}, {"step": 1}, {"step": 2}]
    torn = json.dumps({"step": 2, "response": "ééé"}, ensure_ascii=False).encode()[:-3]  # ends mid-character
    text = "\n".join([json.dumps(records[0], ensure_ascii=False), json.dumps(records[1]), "[1, 2]", "7",
                      json.dumps(records[2])]) + "\n"
    path.write_bytes(text.encode() + torn)
    assert read_jsonl_before(path, 2) == records[:2]


def test_weights_check_before_a_checkpoint_sees_zero3_partitions():
    """Under ZeRO-3 a parameter is an empty placeholder and this process's part of the weights is its
    `ds_tensor`: a NaN there must count as non-finite weights (no checkpoint is then written)."""
    from checkpoint import parameters_finite

    model = torch.nn.Linear(2, 2)
    for p in model.parameters():
        p.ds_tensor = p.data.clone().flatten()
        p.data = torch.empty(0)
    assert parameters_finite(model)
    model.weight.ds_tensor[1] = float("nan")
    assert not parameters_finite(model)


def test_the_note_about_a_tied_weight_is_dropped_and_any_other_kept():
    import logging

    from checkpoint import TiedWeightsNote

    note = TiedWeightsNote({"lm_head.weight": "model.embed_tokens.weight"})

    def record(message):
        return logging.LogRecord("accelerate.utils.other", logging.WARNING, __file__, 1, message, None, None)

    tied = "[RANK 0] Removed shared tensor {'lm_head.weight'} while saving. This should be OK, but check ..."
    assert not note.filter(record(tied))
    assert not note.filter(record(tied.replace("'lm_head.weight'", "'module.lm_head.weight'")))  # DDP's prefix
    assert note.filter(record(tied.replace("lm_head.weight", "decoder.weight")))  # not tied: the note stays
    assert note.filter(record("[RANK 0] something else"))


def test_step_ranges_and_a_log_synced_to_disk(tmp_path, monkeypatch):
    import os

    from checkpoint import step_ranges
    from utils import JsonlWriter

    assert step_ranges([1, 2, 3, 7]) == "1-3, 7" and step_ranges([0]) == "0"
    assert step_ranges([4, 5, 9, 10]) == "4-5, 9-10"
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    log = JsonlWriter(tmp_path / "metrics.jsonl")
    log.write({"step": 0})
    log.sync()
    assert synced == [log.file.fileno()]
    log.close()


def test_a_checkpoint_is_intact_only_as_its_manifest_lists_it(tmp_path):
    from checkpoint import MANIFEST, checkpoint_problem
    from utils import file_hash

    ckpt = tmp_path / "step-000003"
    (ckpt / "random_states").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "schedulers": [], "args": {}}))
    (ckpt / "random_states" / "rng_0.pkl").write_bytes(b"rng")
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "xxh3_128": file_hash(p)}
             for p in ckpt.rglob("*") if p.is_file()}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}))
    assert checkpoint_problem(ckpt) is None
    (ckpt / "random_states" / "rng_1.pkl").write_bytes(b"stray")  # resume handed it to accelerate, which failed
    assert checkpoint_problem(ckpt) == "it holds random_states/rng_1.pkl, which its manifest does not list"
    (ckpt / "notes.txt").write_text("stray")
    assert checkpoint_problem(ckpt) == "it holds notes.txt, which its manifest does not list (and 1 more)"
    (ckpt / "notes.txt").unlink()
    (ckpt / "random_states" / "rng_1.pkl").unlink()
    (ckpt / "random_states" / "rng_0.pkl").write_bytes(b"RNG")
    assert checkpoint_problem(ckpt) == "random_states/rng_0.pkl does not match its hash in the manifest"


def test_links_where_a_run_writes_are_refused_before_anything_is_written(tmp_path):
    """A link at a name the run writes would have it truncate or overwrite a file elsewhere (the lock, config.json's
    temporary copy, a log), or, dangling (`checkpoints`), train until the first checkpoint and then fail."""
    import pytest

    from checkpoint import lock_output_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in (".lock", ".config.json.tmp", "metrics.jsonl", "checkpoints", "policy"):
        out = tmp_path / name.strip(".")
        out.mkdir()
        (elsewhere / name).write_text("not the run's")
        target = elsewhere / name if name != "checkpoints" else tmp_path / "missing"
        (out / name).symlink_to(target)
        with pytest.raises(SystemExit, match=f"{name} is a symbolic link \\(to {target}\\); a run writes only"):
            lock_output_dir(out)
        assert (elsewhere / name).read_text() == "not the run's"
        assert [p.name for p in out.iterdir()] == [name]
