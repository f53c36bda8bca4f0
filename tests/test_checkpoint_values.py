"""cmfast.training.checkpoint called directly: atomic writes, stale temporary files, RNG states, pruning, listing,
metadata, resolve, weight checks and load_model's `which`, against hand-written expectations (mutation gaps: each
test failed with the mutation named in its docstring)."""
import io
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from cmfast.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def tiny():
    """(config, state dict) of a tiny iCT run with EMA rates 0.9 and 0.5."""
    from cmfast.training.config import resolve
    cfg = resolve({"dataset": "fashion-mnist", "method": "ict", "preset": "tiny", "ema": (0.9, 0.5)})
    torch.manual_seed(0)
    return cfg, ckpt.build_model(cfg).state_dict()


def _save(run, step, cfg, sd, keep=0, **more):
    modules = {"model": sd, "ema@0.9": {k: torch.full_like(v, 0.9) if v.is_floating_point() else v
                                        for k, v in sd.items()}, **more}
    return ckpt.save_checkpoint(str(run), step, modules, cfg, {"sampler": {"pos": 0}}, keep=keep)


def _steps(run, complete=True):
    return [s for s, _, _ in ckpt.list_checkpoints(str(run), complete=complete)]


def test_write_chunks_writes_every_byte_in_order():
    """(mutant: each chunk one byte short) 10 bytes in chunks of 3: 3 + 3 + 3 + 1, all of them."""
    f = io.BytesIO()
    ckpt._write_chunks(f, bytes(range(10)), chunk=3)
    assert f.getvalue() == bytes(range(10))


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    """(mutant: the temporary file not removed on error) The disk fills half-way: the old file stays whole, no
    .NAME.tmpPID is left."""
    path = tmp_path / "f.bin"
    ckpt.atomic_write(str(path), b"old")

    def half(f, data, chunk=1 << 24):
        f.write(data[:2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "_write_chunks", half)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_write(str(path), b"new contents")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_remove_stale_temps_keeps_live_writers_and_other_names(tmp_path, monkeypatch):
    """A dead writer's temp and one whose number is no PID (too large) are removed; the live parent's, this
    process's, one whose owner is another user (PermissionError) and names that are no temp of atomic_write stay.
    (mutants: a live writer's temp removed; the PermissionError one removed; OverflowError not caught; '.x.tmp' with
    no number matched)"""
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {f".a.tmp{dead.pid}": False, f".b.tmp{os.getpid()}": True, f".c.tmp{os.getppid()}": True,
             ".d.tmp" + "9" * 30: False, ".e.tmp": True, f"f.tmp{dead.pid}": True, ".g.tmp424242": True}
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    real = os.kill

    def kill(pid, sig):
        if pid == 424242:
            raise PermissionError(1, "Operation not permitted")
        return real(pid, sig)
    monkeypatch.setattr(os, "kill", kill)
    gone = ckpt.remove_stale_temps(str(tmp_path))
    assert gone == sorted(n for n, kept in names.items() if not kept)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)
    assert ckpt.remove_stale_temps(str(tmp_path / "missing")) == []


def test_spare_rng_state_leaves_the_global_generators_alone():
    """set_rng_state(..., spare=True) (--dry-run) sets new generators and changes no global one (mutants: torch's,
    numpy's or Python's global generator set), yet refuses a bad state as the run would."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    other = ckpt.rng_state()
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    want = (torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random() for _ in range(2)])
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    ckpt.set_rng_state(other, spare=True)
    assert (torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random() for _ in range(2)]) == want
    with pytest.raises(RuntimeError):
        ckpt.set_rng_state(dict(other, torch=torch.zeros(3, dtype=torch.uint8)), spare=True)


def test_rng_state_keeps_numpys_and_pythons_cached_gaussians():
    """numpy's and Python's second Gaussian of a pair, drawn after the state is taken, is part of the state (mutants:
    has_gauss 0, Python's gauss None)."""
    np.random.seed(3), random.seed(3)
    np.random.randn(), random.gauss(0, 1)            # each generator now holds a cached second Gaussian
    s = ckpt.rng_state()
    assert s["numpy"]["has_gauss"] == 1 and s["python"]["gauss"] is not None
    want = (np.random.randn(), random.gauss(0, 1))
    np.random.seed(4), random.seed(4)
    ckpt.set_rng_state(s)
    assert (np.random.randn(), random.gauss(0, 1)) == want


def test_save_writes_the_step_config_and_state(tmp_path):
    """The weights file's metadata and the state file: format, the step, the config as JSON, the state's own keys
    (mutant: step + 1 in the metadata)."""
    w = ckpt.save_checkpoint(str(tmp_path), 7, {"model": {"w": torch.arange(3.0)}}, {"method": "ct", "x": [1, 2]},
                             {"counters": {"skipped": 1}})
    from safetensors import safe_open
    with safe_open(w, "pt") as f:
        assert f.metadata() == {"format": ckpt.FORMAT, "step": "7", "config": '{"method": "ct", "x": [1, 2]}'}
    weights, meta = ckpt.load_weights(w)
    assert meta == {"step": 7, "config": {"method": "ct", "x": [1, 2]}}
    assert torch.equal(weights["model"]["w"], torch.tensor([0.0, 1.0, 2.0]))
    state = ckpt.load_state(ckpt.paths(str(tmp_path), 7)[1])
    assert state == {"format": ckpt.FORMAT, "step": 7, "config": '{"method": "ct", "x": [1, 2]}',
                     "counters": {"skipped": 1}}


def test_keep_prunes_to_the_newest_up_to_the_step_written(tmp_path):
    """keep k: the k newest checkpoints up to the step written stay, incomplete ones (weights alone) among those
    pruned; later steps are never pruned; keep 0 keeps all; the default is 3. (mutants: default 2; '<' step; one
    more kept; keep 1 pruning nothing; incomplete ones not pruned)"""
    def save(step, keep=None):
        kw = {} if keep is None else {"keep": keep}
        ckpt.save_checkpoint(str(tmp_path), step, {"model": {"w": torch.ones(1)}}, {}, {}, **kw)
    for s in (1, 2, 3, 4, 5):
        save(s)
    assert _steps(tmp_path) == [3, 4, 5]                              # the default keep is 3
    save(6, keep=2)
    assert _steps(tmp_path) == [5, 6]
    save(9, keep=0)
    save(10, keep=0)
    os.remove(ckpt.paths(str(tmp_path), 6)[1])                       # step 6 incomplete (weights only)
    save(7, keep=1)                                                   # a resumed line: 9 and 10 are later ones
    assert _steps(tmp_path, complete=False) == [7, 9, 10]
    save(8, keep=0)
    assert _steps(tmp_path) == [7, 8, 9, 10]


def test_list_checkpoints_oldest_first_complete_by_default(tmp_path):
    """(step, weights, state), sorted by step; only complete pairs unless complete=False; no folder: [] (mutants:
    complete=False by default; 'and'; newest first)."""
    for s in (10, 2, 33):
        ckpt.save_checkpoint(str(tmp_path), s, {"model": {"w": torch.ones(1)}}, {}, {}, keep=0)
    os.remove(ckpt.paths(str(tmp_path), 33)[1])
    (tmp_path / "ckpt-5.safetensors").write_bytes(b"")          # not 8 digits: no checkpoint name
    assert ckpt.list_checkpoints(str(tmp_path)) == [(s, *ckpt.paths(str(tmp_path), s)) for s in (2, 10)]
    assert _steps(tmp_path, complete=False) == [2, 10, 33]
    assert ckpt.list_checkpoints(str(tmp_path / "none")) == []


def test_load_weights_gives_the_tensors_in_name_order(tmp_path):
    """Tensors in the order of their names, the same in every process (mutant: safetensors' own order, which changes
    from one process to the next)."""
    names = [f"t{i:02d}" for i in range(40)]
    random.Random(0).shuffle(names)
    w = ckpt.save_checkpoint(str(tmp_path), 1, {"model": {n: torch.full((1,), float(i)) for i, n in enumerate(names)}},
                             {}, {})
    assert list(ckpt.load_weights(w)[0]["model"]) == sorted(names)


def test_metadata_errors_are_one_line():
    """Another format, a config that is no dict, one nested too deep for JSON (RecursionError), a step that is no
    number: each one CheckpointError naming the file (mutants: any format but none accepted; a list accepted;
    RecursionError not caught)."""
    ok = {"format": ckpt.FORMAT, "step": "3", "config": "{}"}
    assert ckpt._parse_meta("p", ok) == {"step": 3, "config": {}}
    for meta, why in ((dict(ok, format="other-1"), r"p: not a cmfast checkpoint \(format 'other-1', expected "
                                                   r"'cmfast-checkpoint-1'\)"),
                      (dict(ok, config="[1]"), r"p: damaged checkpoint metadata \(step and config expected; "
                                               r"TypeError: config is a list, not a dict\)"),
                      (dict(ok, config="[" * 100000 + "]" * 100000),
                       r"p: damaged checkpoint metadata .*RecursionError"),
                      (dict(ok, step="x"), r"p: damaged checkpoint metadata .*ValueError")):
        with pytest.raises(ckpt.CheckpointError, match=f"^{why}"):
            ckpt._parse_meta("p", meta)


def test_unreadable_names_the_file_and_the_errors_first_line():
    """(mutant: the whole multi-line message)"""
    assert str(ckpt._unreadable("p", ValueError("first\nsecond"))) == "p: unreadable checkpoint (first)"
    assert str(ckpt._unreadable("p", OSError())) == "p: unreadable checkpoint ()"


def test_an_ema_module_of_its_own_name_is_read_as_ema(tmp_path, tiny):
    """A file whose EMA module is named 'ema' (no rate) is read as which='ema' even when its config lists rates
    (mutant: 'ema' always mapped to 'ema@<first rate>', which this file lacks)."""
    cfg, sd = tiny
    ckpt.save_checkpoint(str(tmp_path), 1, {"ema": {k: torch.full_like(v, 0.25) for k, v in sd.items()}}, cfg, {})
    model, meta = ckpt.load_model(str(tmp_path))
    assert meta["which"] == "ema"
    assert all(torch.all(v == 0.25) for v in model.state_dict().values() if v.is_floating_point())


def test_load_state_refuses_files_that_are_no_training_state(tmp_path):
    """A torch file of a dict without cmfast's format, or of a list: 'not a cmfast training state' (mutants: the
    format not checked; 'and' for 'or')."""
    for i, obj in enumerate(({"format": "x", "step": 1}, {"step": 1}, [1, 2])):
        p = tmp_path / f"{i}.state.pt"
        torch.save(obj, p)
        with pytest.raises(ckpt.CheckpointError, match=f"^{p}: not a cmfast training state$"):
            ckpt.load_state(str(p))
    (tmp_path / "cut.state.pt").write_bytes(b"PK\x03")
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable training state"):
        ckpt.load_state(str(tmp_path / "cut.state.pt"))


def test_resolve_names_the_newest_complete_weights(tmp_path):
    """A folder: its newest complete pair; a .state.pt: its weights; another file: not a checkpoint (mutants: the
    oldest; .state.pt not mapped; any file taken)."""
    for s in (1, 4, 6):
        ckpt.save_checkpoint(str(tmp_path), s, {"model": {"w": torch.ones(1)}}, {}, {}, keep=0)
    os.remove(ckpt.paths(str(tmp_path), 6)[1])
    w4, s4 = ckpt.paths(str(tmp_path), 4)
    assert ckpt.resolve(str(tmp_path)) == w4 and ckpt.resolve(s4) == w4 and ckpt.resolve(w4) == w4
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json: not a checkpoint; give a ckpt-\*\.safetensors"):
        ckpt.resolve(str(tmp_path / "config.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"^no checkpoint \(ckpt-\*\.safetensors with its \.state\.pt\) in"):
        ckpt.resolve(str(tmp_path / "empty"))


def test_bad_weight_names_the_first_tensor_that_is_no_finite_float():
    """Integer and bool tensors and non-tensors are no weights; NaN and inf both count (mutants: integer tensors
    passed; inf not counted)."""
    assert ckpt.bad_weight({"a": torch.zeros(2), "b": torch.ones(3, dtype=torch.float16)}) is None
    assert ckpt.bad_weight({"a": torch.zeros(2), "n": torch.tensor([1, 2])}) == "n is torch.int64, not floating point"
    assert ckpt.bad_weight({"m": torch.tensor([True])}) == "m is torch.bool, not floating point"
    assert ckpt.bad_weight({"l": [1.0]}) == "l is list, not floating point"
    x = torch.tensor([1.0, float("inf"), float("nan"), -float("inf")])
    assert ckpt.bad_weight({"ok": torch.ones(1), "x": x, "y": x}) == "x holds 3 NaN / inf value(s)"


def test_details_is_the_keys_lines_as_one_line_of_at_most_200():
    """load_state_dict's message without its first line (which names only the model), cut to 200 characters with
    '...' (mutants: the first line kept; cut at 203; a limit of 100)."""
    e = RuntimeError("Error(s) in loading state_dict for UNet:\n\tMissing key(s): a.\n\tUnexpected key(s): b. ")
    assert ckpt._details(e) == "Missing key(s): a. Unexpected key(s): b."
    assert ckpt._details(RuntimeError("just one")) == "just one"
    assert ckpt._details(KeyError()) == "KeyError"
    long = RuntimeError("head\n" + "x" * 150 + "\n" + "y" * 60)
    assert ckpt._details(long) == "x" * 150 + " " + "y" * 46 + "..." and len(ckpt._details(long)) == 200
    assert ckpt._details(RuntimeError("h\n" + "z" * 200)) == "z" * 200


def test_load_model_reads_the_first_ema_rate_frozen_in_eval_mode(tmp_path, tiny):
    """which defaults to 'ema' (the first rate); the model is in eval mode with no gradients; meta names what was read;
    'model' reads the online weights; a missing module is named with those there are (mutants: default 'model';
    requires_grad left on; train mode; meta's which 'ema')."""
    cfg, sd = tiny
    _save(tmp_path, 1, cfg, sd)
    model, meta = ckpt.load_model(str(tmp_path))
    assert meta == {"step": 1, "config": cfg, "path": ckpt.paths(str(tmp_path), 1)[0], "which": "ema@0.9"}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.all(v == 0.9) for v in model.state_dict().values() if v.is_floating_point())
    online, meta = ckpt.load_model(str(tmp_path), "model")
    assert meta["which"] == "model"
    assert all(torch.equal(v, sd[k]) for k, v in online.state_dict().items())
    with pytest.raises(ckpt.CheckpointError, match=r"has no 'target' weights; it has ema@0\.9, model$"):
        ckpt.load_model(str(tmp_path), "target")
    with pytest.raises(ckpt.CheckpointError, match=r"a \.pt file is not a cmfast checkpoint"):
        ckpt.load_model(str(tmp_path / "x.pt"))
    with pytest.raises(ckpt.CheckpointError, match=r"an EDM pickle holds 'ema' weights only, got which='model'"):
        ckpt.load_model(str(tmp_path / "x.pkl"), "model")


def test_load_model_and_check_model_refuse_nan_weights_and_damaged_ema_metadata(tmp_path, tiny):
    """A NaN in the weights read is named, by load_model and by check_model (--dry-run's teacher check) alike; a
    config 'ema' that is no list of rates is damaged metadata (mutants: the weight check dropped from either; ValueError
    of float('a') not caught)."""
    cfg, sd = tiny
    bad = {k: v.clone() for k, v in sd.items()}
    name = sorted(k for k, v in bad.items() if v.is_floating_point())[0]
    bad[name].view(-1)[0] = float("nan")
    (tmp_path / "a").mkdir()
    _save(tmp_path / "a", 1, cfg, sd, **{"ema@0.9": bad})
    for load in (ckpt.load_model, ckpt.check_model):
        with pytest.raises(ckpt.CheckpointError, match=rf"bad ema@0\.9 weights: {name} holds 1 NaN / inf value"):
            load(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    _save(tmp_path / "b", 1, dict(cfg, ema=["a"]), sd)
    for load in (ckpt.load_model, ckpt.check_model):
        with pytest.raises(ckpt.CheckpointError, match=r"damaged checkpoint metadata \(config 'ema' is \['a'\], not a "
                                                       r"list of EMA rates\)"):
            load(str(tmp_path / "b"))


def test_check_model_compares_shapes_and_reads_ema_by_default(tmp_path, tiny):
    """check_model: which 'ema' by default; a weight of another shape than the config's is refused, as load_model
    refuses it (mutants: default 'model'; the shape check dropped)."""
    cfg, sd = tiny
    (tmp_path / "a").mkdir()
    _save(tmp_path / "a", 2, cfg, sd)
    assert ckpt.check_model(str(tmp_path / "a")) == {"step": 2, "config": cfg, "which": "ema@0.9",
                                                     "path": ckpt.paths(str(tmp_path / "a"), 2)[0]}
    wide = dict(sd, **{"net.out_conv.bias": torch.zeros(sd["net.out_conv.bias"].numel() + 1)})
    (tmp_path / "b").mkdir()
    ckpt.save_checkpoint(str(tmp_path / "b"), 1, {"ema@0.9": wide}, cfg, {})
    n = sd["net.out_conv.bias"].numel()
    for load in (ckpt.load_model, ckpt.check_model):
        with pytest.raises(ckpt.CheckpointError, match=rf"weights do not match the stored config \(size mismatch "
                                                       rf"net\.out_conv\.bias: \({n + 1},\) in the file, \({n},\) for "
                                                       rf"the config\)$"):
            load(str(tmp_path / "b"))


def test_check_tensors_reads_modules_in_the_order_given_each_by_name(tmp_path):
    """The first bad tensor of the first module named is reported, as a bad-weights error (not 'unreadable'), the
    module's tensors in name order (mutant: a CheckpointError turned into 'unreadable checkpoint'; safetensors'
    keys() come sorted already, so reading them unsorted is equivalent)."""
    mods = {"model": {"z": torch.ones(1), "b": torch.tensor([float("nan")]), "a": torch.tensor([float("inf")])},
            "ema@0.5": {"c": torch.tensor([float("nan")])}}
    w = ckpt.save_checkpoint(str(tmp_path), 1, mods, {}, {})
    with pytest.raises(ckpt.CheckpointError, match=rf"^{w}: bad model weights: a holds 1 NaN / inf value\(s\) "
                                                   r"\(the run diverged or the file is damaged\)$"):
        ckpt.check_tensors(w, ["model", "ema@0.5"])
    with pytest.raises(ckpt.CheckpointError, match=r": bad ema@0\.5 weights: c holds 1 NaN"):
        ckpt.check_tensors(w, ["ema@0.5", "model"])


def test_residual_blocks_counts_the_nets_unet_blocks(tiny):
    """_residual_blocks is the number of UNetBlock modules the net builds (counted here on the built tiny net and one
    of 3 blocks a level), and a file with exactly 10 tensors a block is compared key by key, not refused by the
    count; a negative or non-integer num_blocks: None (mutants: decoder levels * n; 11 a block; n < 0 allowed)."""
    from cmfast.nets import UNet
    from cmfast.nets.unet import UNetBlock
    cfg, _ = tiny
    for net in (cfg["net"], dict(cfg["net"], num_blocks=3)):
        with torch.device("meta"):
            built = sum(isinstance(m, UNetBlock) for m in UNet(**net).modules())
        assert ckpt._residual_blocks(dict(cfg, net=net)) == built
    blocks = ckpt._residual_blocks(cfg)
    fake = {f"x{i}": ckpt._Shaped((1,)) for i in range(10 * blocks)}
    assert ckpt._shape_mismatch("p", ckpt.build_model, cfg, fake).startswith("missing ")
    assert ckpt._shape_mismatch("p", ckpt.build_model, cfg, dict(list(fake.items())[1:])).startswith(
        f"the config asks for {blocks} residual blocks")
    for n in (-1, 1.5, True):
        assert ckpt._residual_blocks(dict(cfg, net=dict(cfg["net"], num_blocks=n))) is None


def test_shape_mismatch_lists_each_kind_and_cuts_at_200(tiny):
    """Missing, unexpected and size-mismatched keys, each named; a long list is cut to 200 characters (mutants:
    unexpected keys not listed; ranks compared instead of shapes; no cut)."""
    cfg, sd = tiny
    shaped = {k: ckpt._Shaped(tuple(v.shape)) for k, v in sd.items()}
    assert ckpt._shape_mismatch("p", ckpt.build_model, cfg, shaped) is None
    k = "net.out_conv.weight"
    s = tuple(sd[k].shape)
    edited = dict(shaped, **{k: ckpt._Shaped((s[0], s[1] + 1, *s[2:])), "net.more": ckpt._Shaped((1,))})
    edited.pop("net.out_conv.bias")
    assert ckpt._shape_mismatch("p", ckpt.build_model, cfg, edited) == (
        f"missing net.out_conv.bias; unexpected net.more; size mismatch {k}: {(s[0], s[1] + 1, *s[2:])} in the file, "
        f"{s} for the config")
    many = dict(shaped, **{f"net.extra{i:03d}": ckpt._Shaped((1,)) for i in range(100)})
    why = ckpt._shape_mismatch("p", ckpt.build_model, cfg, many)
    assert len(why) == 200 and why.startswith("unexpected net.extra000, net.extra001") and why.endswith("...")
