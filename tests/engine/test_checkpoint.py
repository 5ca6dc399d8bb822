"""Checkpoints: exact round trip, atomic under a crash mid-save, safetensors only."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tether.config import TrainConfig
from tether.engine import checkpoint
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import tiny_llama
from tether.engine.optimize import build_optimizer, build_scheduler


def _setup(seed=0):
    model = CausalLMLogps(tiny_llama(vocab_size=32, tie=True, seed=seed), chunk_size=8)
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    sched = build_scheduler(opt, TrainConfig(lr=1e-2, warmup_ratio=0.5), total_steps=10)
    return model, opt, sched


def _step(model, opt, sched):
    ids = torch.randint(0, 32, (2, 6))
    loss = -model(ids, torch.ones(2, 6, dtype=torch.bool)).sum()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _setup()
    _step(model, opt, sched)
    checkpoint.save(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                    trainer_state={"note": "x"})
    expected_next = torch.rand(3)  # what the RNG gives right after the save
    lr_at_save = opt.param_groups[0]["lr"]
    _step(model, opt, sched)
    after_two = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, opt2, sched2 = _setup(seed=1)  # different init: everything must come from disk
    buffers = {id(p): st["exp_avg"].data_ptr() for p, st in opt2.state.items()}
    state = checkpoint.load(checkpoint.latest(tmp_path), model=model2, optimizer=opt2,
                            scheduler=sched2)
    # the moments are loaded into the buffers allocated with the optimizer, not new ones
    assert {id(p): st["exp_avg"].data_ptr() for p, st in opt2.state.items()} == buffers
    assert state == {"step": 1, "note": "x"}
    torch.testing.assert_close(torch.rand(3), expected_next, atol=0, rtol=0)
    assert sched2.last_epoch == 1
    assert opt2.param_groups[0]["lr"] == lr_at_save
    torch.manual_seed(123)
    _step(model2, opt2, sched2)
    # replay the same step on the original with the same data: equal to the bit
    model3, opt3, sched3 = _setup(seed=2)
    checkpoint.load(checkpoint.latest(tmp_path), model=model3, optimizer=opt3, scheduler=sched3)
    torch.manual_seed(123)
    _step(model3, opt3, sched3)
    for (n, p2), (_, p3) in zip(model2.named_parameters(), model3.named_parameters()):
        torch.testing.assert_close(p2, p3, atol=0, rtol=0)
    assert set(after_two) == {n for n, _ in model2.named_parameters()}


def test_tied_embeddings_saved_once(tmp_path):
    from safetensors.torch import load_file

    model, opt, sched = _setup()
    path = checkpoint.save(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={})
    names = set(load_file(path / "model.safetensors"))
    assert "model.model.embed_tokens.weight" in names
    assert "model.lm_head.weight" not in names  # tied: one tensor, one name
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path):
    """A process killed (os._exit, no cleanup) in the middle of writing checkpoint 2 leaves
    checkpoint 1 and the `latest` pointer intact; the next save sweeps the debris."""
    script = textwrap.dedent(f"""
        import os, torch
        from tether.engine import checkpoint
        from tests.engine.test_checkpoint import _setup, _step
        model, opt, sched = _setup()
        _step(model, opt, sched)
        checkpoint.save({str(tmp_path)!r}, 1, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={{}})
        real = checkpoint.save_file
        def dying(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if str(path).endswith("optimizer.safetensors") and ".tmp-step-000002" in str(path):
                os._exit(9)  # killed mid-save: model and optimizer written, state.json not
        checkpoint.save_file = dying
        _step(model, opt, sched)
        checkpoint.save({str(tmp_path)!r}, 2, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={{}})
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert (tmp_path / ".tmp-step-000002").is_dir()  # the debris of the killed save
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000001"
    model, opt, sched = _setup(seed=3)
    assert checkpoint.load(checkpoint.latest(tmp_path), model=model, optimizer=opt,
                           scheduler=sched)["step"] == 1
    checkpoint.save(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, trainer_state={})
    assert not (tmp_path / ".tmp-step-000002").exists()
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000002"


def _saved(root, *steps):
    model, opt, sched = _setup()
    for step in steps:
        checkpoint.save(root, step, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={}, keep_last=0)
    return model, opt, sched


def test_latest_ignores_incomplete_dirs_and_stale_pointer(tmp_path):
    (tmp_path / "step-000005").mkdir()  # no state.json: incomplete
    assert checkpoint.latest(tmp_path) is None
    _saved(tmp_path, 3)
    (tmp_path / "latest").write_text("step-000005")
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000003"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _cut_header(path):
    path.write_bytes(path.read_bytes()[:6])


def _bad_header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff{["
    path.write_bytes(bytes(data))


def _json_cut(path):
    path.write_text(path.read_text()[:40])


def _json_lacks_step(path):
    state = json.loads(path.read_text())
    del state["step"]
    path.write_text(json.dumps(state))


def _grown(path):  # a whole safetensors file whose size is not the one written
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["extra"] = torch.zeros(3)
    save_file(tensors, path)


def _flip_a_byte(path):  # same size, whole header: only the checksum can tell
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = [  # (what, file, damage, the reason `latest` prints)
    ("model_missing", "model.safetensors", lambda p: p.unlink(), "model.safetensors is missing"),
    ("optimizer_truncated", "optimizer.safetensors", _truncate,
     "optimizer.safetensors is .* bytes but .* were written"),
    ("rng_header_cut", "rng.safetensors", _cut_header, "rng.safetensors is .* bytes"),
    ("model_header_corrupt", "model.safetensors", _bad_header, "model.safetensors"),
    ("state_json_cut", "state.json", _json_cut, "state.json is not valid JSON"),
    ("state_json_lacks_step", "state.json", _json_lacks_step, "state.json lacks step"),
    ("state_json_missing", "state.json", lambda p: p.unlink(), "no state.json"),
    ("model_other_size", "model.safetensors", _grown, "model.safetensors is .* but .* written"),
    ("model_byte_flipped", "model.safetensors", _flip_a_byte,
     "model.safetensors does not match the checksum written with it"),
    ("optimizer_byte_flipped", "optimizer.safetensors", _flip_a_byte,
     "optimizer.safetensors does not match the checksum"),
]


@pytest.mark.parametrize("what, name, damage, reason", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(
        tmp_path, capsys, what, name, damage, reason):
    import re

    _saved(tmp_path, 1, 2)
    damage(tmp_path / "step-000002" / name)
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000001"
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(
        rf"^tether: checkpoint {re.escape(str(tmp_path / 'step-000002'))} is unusable \({reason}"
        r".*\); using step-000001$", err), err
    # loading the damaged one by name is a one-line error, not a traceback from safetensors
    from tether.errors import TetherError

    model, opt, sched = _setup()
    with pytest.raises(TetherError, match="step-000002 is unusable"):
        checkpoint.load(tmp_path / "step-000002", model=model, optimizer=opt, scheduler=sched)
    assert checkpoint.load(checkpoint.latest(tmp_path), model=model, optimizer=opt,
                           scheduler=sched)["step"] == 1


def test_no_usable_checkpoint_names_each_one(tmp_path, capsys):
    _saved(tmp_path, 1)
    _truncate(tmp_path / "step-000001" / "model.safetensors")
    assert checkpoint.latest(tmp_path) is None
    assert "step-000001 is unusable (model.safetensors" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    from tether.errors import TetherError

    _saved(tmp_path, 1)
    other = CausalLMLogps(tiny_llama(vocab_size=32, tie=False), chunk_size=8)
    with pytest.raises(TetherError, match="does not match the model.*model.name_or_path"):
        checkpoint.load(tmp_path / "step-000001", model=other)


def test_a_crash_while_pruning_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Pruning renames the old checkpoint away first: killed inside rmtree, no `step-*`
    directory is left half deleted (the debris is hidden and swept by the next save)."""
    model, opt, sched = _saved(tmp_path, 1)

    class Killed(Exception):
        pass

    def dying_rmtree(path, ignore_errors=False):
        (path / "model.safetensors").unlink()  # got this far
        raise Killed

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dying_rmtree)
    with pytest.raises(Killed):
        checkpoint.save(tmp_path, 2, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={}, keep_last=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002"]
    assert checkpoint.problem(tmp_path / "step-000002") is None
    checkpoint.save(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, trainer_state={},
                    keep_last=1)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, opt, sched = _setup()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]


def _tiny_export_model():
    from tether.engine.models import tiny_llama

    return tiny_llama(vocab_size=64, tie=True, pad_token_id=0)


def test_export_with_force_replaces_only_what_an_export_wrote(tmp_path, default_tokenizer):
    """Into a folder holding a user's file: refused without force; with force the export's files
    land, the user's file is untouched, and a file only the previous export wrote (listed in
    its manifest) is removed on the next forced export."""
    from tether.errors import TetherError

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TetherError, match="exists and is not empty"):
        checkpoint.export(_tiny_export_model(), default_tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    checkpoint.export(_tiny_export_model(), default_tokenizer, out, force=True)
    written = set(json.loads((out / checkpoint.EXPORT_MANIFEST).read_text())["files"])
    assert {"config.json", "model.safetensors"} <= written
    assert {p.name for p in out.iterdir()} == written | {"notes.txt", checkpoint.EXPORT_MANIFEST}
    # a file the previous export claimed but this one does not write goes; the user's stays
    (out / "stale.json").write_text("{}")
    (out / checkpoint.EXPORT_MANIFEST).write_text(json.dumps({"files": [*written, "stale.json",
                                                                        "../escape"]}))
    checkpoint.export(_tiny_export_model(), default_tokenizer, out, force=True)
    assert not (out / "stale.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out-export-*"))  # the staging folder is gone


def test_export_into_a_new_or_empty_folder_needs_no_force(tmp_path, default_tokenizer):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        checkpoint.export(_tiny_export_model(), default_tokenizer, out)
        assert (out / "config.json").is_file() and (out / checkpoint.EXPORT_MANIFEST).is_file()
