"""cmfast.cm_import: the CM paper's released checkpoints (openai/consistency_models, guided-diffusion's UNetModel
state dicts) as cmfast models. No released file can be fetched here: the state dicts are generated with the layout
UNetModel's constructor gives (cm/unet.py, read from openai/consistency_models), and the imported network is checked
against a float64 transcription of UNetModel.forward written from that file, not against cmfast's own code."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import cmfast
from cmfast import cm_import
from cmfast.training.checkpoint import load_model


def _openai_state(mc=128, mult=(1, 2), n=1, attn_ds=(2,), classes=3, in_ch=3, seed=0, scale_shift=True, emb=4):
    """A random UNetModel state dict (resblock_updown, 64 channels a head; use_scale_shift_norm as given: the
    ImageNet models have it, the LSUN ones not; time embedding emb x model_channels wide, 4 in UNetModel): names and
    shapes as its constructor makes them."""
    g = torch.Generator().manual_seed(seed)
    sd, ss = {}, 2 if scale_shift else 1

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def res(p, cin, cout):
        sd.update({f"{p}.in_layers.0.weight": 1 + t(cin), f"{p}.in_layers.0.bias": t(cin),
                   f"{p}.in_layers.2.weight": t(cout, cin, 3, 3), f"{p}.in_layers.2.bias": t(cout),
                   f"{p}.emb_layers.1.weight": t(ss * cout, emb * mc), f"{p}.emb_layers.1.bias": t(ss * cout),
                   f"{p}.out_layers.0.weight": 1 + t(cout), f"{p}.out_layers.0.bias": t(cout),
                   f"{p}.out_layers.3.weight": t(cout, cout, 3, 3), f"{p}.out_layers.3.bias": t(cout)})
        if cin != cout:
            sd.update({f"{p}.skip_connection.weight": t(cout, cin, 1, 1), f"{p}.skip_connection.bias": t(cout)})

    def att(p, c):
        sd.update({f"{p}.norm.weight": 1 + t(c), f"{p}.norm.bias": t(c), f"{p}.qkv.weight": t(3 * c, c, 1),
                   f"{p}.qkv.bias": t(3 * c), f"{p}.proj_out.weight": t(c, c, 1), f"{p}.proj_out.bias": t(c)})

    sd.update({"time_embed.0.weight": t(emb * mc, mc), "time_embed.0.bias": t(emb * mc),
               "time_embed.2.weight": t(emb * mc, emb * mc), "time_embed.2.bias": t(emb * mc)})
    if classes:
        sd["label_emb.weight"] = t(classes, emb * mc, scale=1.0)
    ch = mult[0] * mc
    sd.update({"input_blocks.0.0.weight": t(ch, in_ch, 3, 3), "input_blocks.0.0.bias": t(ch)})
    chans, i, ds = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(n):
            res(f"input_blocks.{i}.0", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                att(f"input_blocks.{i}.1", ch)
            chans.append(ch)
            i += 1
        if level != len(mult) - 1:
            res(f"input_blocks.{i}.0", ch, ch)
            chans.append(ch)
            i, ds = i + 1, ds * 2
    res("middle_block.0", ch, ch)
    att("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    j = 0
    for level, m in list(enumerate(mult))[::-1]:
        for k in range(n + 1):
            res(f"output_blocks.{j}.0", ch + chans.pop(), m * mc)
            ch, idx = m * mc, 1
            if ds in attn_ds:
                att(f"output_blocks.{j}.1", ch)
                idx = 2
            if level and k == n:
                res(f"output_blocks.{j}.{idx}", ch, ch)
                ds //= 2
            j += 1
    sd.update({"out.0.weight": 1 + t(ch), "out.0.bias": t(ch), "out.2.weight": t(in_ch, mult[0] * mc, 3, 3),
               "out.2.bias": t(in_ch)})
    return sd


def _downs(n, levels):
    """input_blocks indices of UNetModel's down ResBlocks: after each level's n blocks, but the last level's."""
    return {1 + (level + 1) * n + level for level in range(levels - 1)}


def _reference(sd, x, t, y, downs, qkv_order="flash"):
    """UNetModel.forward (cm/unet.py) in float64: timestep_embedding, time_embed, label_emb, the input / middle /
    output TimestepEmbedSequentials (ResBlock with scale-shift norm and avg-pool / nearest resampling, AttentionBlock
    with the flash (q|k|v, head, channel) or legacy (head, q|k|v, channel) qkv layout), out."""
    def gn(h, p):
        return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def resblock(h, p, emb, up=False, down=False):
        x0 = h
        h = F.silu(gn(h, p + ".in_layers.0"))
        if up or down:
            rs = (lambda v: F.interpolate(v, scale_factor=2, mode="nearest")) if up else (lambda v: F.avg_pool2d(v, 2))
            h, x0 = rs(h), rs(x0)
        h = F.conv2d(h, sd[p + ".in_layers.2.weight"], sd[p + ".in_layers.2.bias"], padding=1)
        e = F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])[..., None, None]
        if e.shape[1] == 2 * h.shape[1]:                                  # use_scale_shift_norm
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(gn(h, p + ".out_layers.0") * (1 + scale) + shift)
        else:
            h = F.silu(gn(h + e, p + ".out_layers.0"))
        h = F.conv2d(h, sd[p + ".out_layers.3.weight"], sd[p + ".out_layers.3.bias"], padding=1)
        if p + ".skip_connection.weight" in sd:
            x0 = F.conv2d(x0, sd[p + ".skip_connection.weight"], sd[p + ".skip_connection.bias"])
        return x0 + h

    def attention(h, p):
        b, c, hh, ww = h.shape
        T, H, D = hh * ww, c // 64, 64
        qkv = F.conv1d(gn(h, p + ".norm").reshape(b, c, T), sd[p + ".qkv.weight"], sd[p + ".qkv.bias"])
        if qkv_order == "flash":
            q, k, v = qkv.reshape(b, 3, H, D, T).unbind(1)
        else:
            q, k, v = qkv.reshape(b, H, 3, D, T).unbind(2)
        w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(D), dim=-1)
        a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, c, T)
        return h + F.conv1d(a, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"]).reshape(b, c, hh, ww)

    def seq(h, kind_of_block, i, emb):     # a TimestepEmbedSequential: its modules in order
        prefix = f"{kind_of_block}.{i}"
        n_res = 0
        for j in range(4):
            p = f"{prefix}.{j}"
            if p + ".qkv.weight" in sd:
                h = attention(h, p)
            elif p + ".in_layers.2.weight" in sd:
                n_res += 1
                h = resblock(h, p, emb, up=kind_of_block == "output_blocks" and n_res == 2,
                             down=kind_of_block == "input_blocks" and i in downs)
            elif p + ".weight" in sd:
                h = F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], padding=1)
        return h

    mc = sd["time_embed.0.weight"].shape[1]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]
    def count(kind):
        return len({k.split(".")[1] for k in sd if k.startswith(kind + ".")})

    hs, h = [], x
    for i in range(count("input_blocks")):
        h = seq(h, "input_blocks", i, emb)
        hs.append(h)
    h = resblock(h, "middle_block.0", emb)
    h = attention(h, "middle_block.1")
    h = resblock(h, "middle_block.2", emb)
    for j in range(count("output_blocks")):
        h = seq(torch.cat([h, hs.pop()], dim=1), "output_blocks", j, emb)
    return F.conv2d(F.silu(gn(h, "out.0")), sd["out.2.weight"], sd["out.2.bias"], padding=1)


@pytest.mark.parametrize("qkv_order", ["flash", "legacy"])
@pytest.mark.parametrize("n,attn_ds,classes,ss", [(1, (2,), 3, True), (2, (1, 2), 0, True), (1, (2,), 0, False)],
                         ids=["cond", "uncond-2blocks", "lsun-additive"])
def test_imported_network_equals_unetmodel(qkv_order, n, attn_ds, classes, ss, tmp_path):
    """The imported cmfast UNet(arch='adm', noise_scale=1000) at c_noise = ln(sigma) / 4 equals UNetModel at its
    time 1000 ln(sigma) / 4, in float64, with every weight random: layout, qkv reordering, label table, time scale."""
    sd = {k: v.float() for k, v in _openai_state(n=n, attn_ds=attn_ds, classes=classes, scale_shift=ss).items()}
    weights, cfg = cm_import.convert(sd, img_resolution=16, qkv_order=qkv_order)
    assert (cfg["arch"], cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"], cfg["noise_scale"],
            cfg["adaptive_scale"]) == ("adm", 128, [1, 2], n, 1000.0, ss)
    assert cfg["attn_resolutions"] == sorted((16 // d for d in attn_ds), reverse=True)
    net = cmfast.UNet(**cfg).double().eval()
    net.load_state_dict({k: v.double() for k, v in weights.items()})
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.5, 20.0], dtype=torch.float64)
    c_noise = sigma.log() / 4
    y = torch.tensor([2, 0]) if classes else None
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        out = net(x, c_noise, y)
        want = _reference({k: v.double() for k, v in sd.items()}, x, 1000 * c_noise, y, _downs(n, 2), qkv_order)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    if qkv_order == "flash":     # the other layout on the same weights is a different network: the order matters
        other = cm_import.convert(sd, img_resolution=16, qkv_order="legacy")[0]
        net.load_state_dict({k: v.double() for k, v in other.items()})
        with cmfast.ops.use_backend("torch"), torch.no_grad():
            assert (net(x, c_noise, y) - want).abs().max() > 1e-3


def test_embedding_width_and_channel_multipliers_are_read_off_the_weights():
    """channel_mult_emb is the time embedding's width over model_channels (4 in the released models, any multiple
    in a state dict), channel_mult each level's channels over it."""
    sd = {k: v.float() for k, v in _openai_state(mult=(1, 2, 2), attn_ds=(4,), classes=0, emb=2).items()}
    weights, cfg = cm_import.convert(sd, img_resolution=32)
    assert (cfg["channel_mult_emb"], cfg["channel_mult"], cfg["attn_resolutions"]) == (2, [1, 2, 2], [8])
    assert weights["map_layer0.weight"].shape == (256, 128)


def test_checkpoint_files_and_errors(tmp_path, capsys):
    """A released-style file converts (python -m cmfast.cm_import) to a cmfast checkpoint that cmfast-sample uses,
    as a consistency model or as the EDM teacher; foreign and unsupported files are one-line errors."""
    from cmfast.cli.sample import main as sample_main
    sd = {k: v.float() for k, v in _openai_state().items()}
    torch.save(sd, tmp_path / "cd.pt")
    out = tmp_path / "cd.safetensors"
    assert cm_import.main([str(tmp_path / "cd.pt"), str(out), "--image-size", "16"]) == 0
    model, meta = load_model(str(out))
    assert isinstance(model, cmfast.ConsistencyModel) and meta["config"]["method"] == "cd"
    assert model.net.noise_scale == 1000.0 and model.net.label_dim == 3
    assert sample_main(["--checkpoint", str(out), "--num", "3", "--npz", str(tmp_path / "s.npz"),
                        "--device", "cpu"]) == 0
    with pytest.raises(SystemExit):                      # the .pt itself: a one-line hint to convert it
        sample_main(["--checkpoint", str(tmp_path / "cd.pt"), "--num", "1", "--npz", str(tmp_path / "t.npz")])
    assert "convert with python -m cmfast.cm_import" in capsys.readouterr().err
    teacher, _ = cm_import.load_cm_checkpoint(str(tmp_path / "cd.pt"), kind="edm", img_resolution=16)
    assert isinstance(teacher, cmfast.EDMDenoiser)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    extra = dict(sd, **{"input_blocks.1.0.extra.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for name, match in (("other.pt", "not a state dict of openai/consistency_models"),
                        ("extra.pt", "unused .*extra.weight"),
                        ("junk.pt", r"junk.pt: unreadable: not a PyTorch weights file \(torch.load with "
                                    r"weights_only=True, which reads the paper's released .pt files, raised \w+\)$"),
                        ("missing.pt", "not found")):
        with pytest.raises(cm_import.CMCheckpointError, match=match) as e:
            cm_import.load_cm_checkpoint(str(tmp_path / name), img_resolution=16)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(cm_import.CMCheckpointError, match=r"GroupNorms of \[64\] channels: guided-diffusion uses 32"):
        cm_import.convert({k: v.float() for k, v in _openai_state(mc=64).items()}, img_resolution=16)
    assert cm_import.main([str(tmp_path / "junk.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "cmfast.cm_import: error:" in capsys.readouterr().err


def test_values_that_are_no_weights_are_one_line(tmp_path, capsys):
    """A state dict with the right names but a value that is no float tensor (a list, an int64 or complex tensor),
    NaN weights, a missing weight or one of another rank: lists and wrong ranks were AttributeError / IndexError /
    KeyError / RuntimeError tracebacks, integer / complex values were cast and NaN written into the converted file
    (exit 0). Now each is a CMCheckpointError naming the file and the weight; python -m cmfast.cm_import exits 2 and
    leaves an existing output file as it was."""
    sd = {k: v.float() for k, v in _openai_state(mc=128, classes=0).items()}
    nan = dict(sd, **{"out.2.weight": sd["out.2.weight"].clone()})
    nan["out.2.weight"][0, 0, 0, 0] = float("nan")
    missing = {k: v for k, v in sd.items() if k != "out.2.weight"}
    cases = {"list": (dict(sd, **{"time_embed.0.weight": [1.0, 2.0]}),
                      "time_embed.0.weight is list, not floating point"),
             "int": (dict(sd, **{"out.2.bias": sd["out.2.bias"].long()}),
                     "out.2.bias is torch.int64, not floating point"),
             "complex": ({k: v.to(torch.complex64) for k, v in sd.items()}, "is torch.complex64, not floating point"),
             "nan": (nan, "out.2.weight holds 1 NaN / inf value(s)"),
             "missing": (missing, "the weights do not make a UNetModel (KeyError: 'out.2.weight')"),
             "rank": (dict(sd, **{"time_embed.0.weight": torch.zeros(5)}), "do not make a UNetModel (IndexError")}
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older conversion")
    for name, (state, match) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(cm_import.CMCheckpointError) as e:
            cm_import.load_cm_checkpoint(str(tmp_path / f"{name}.pt"), img_resolution=16)
        assert str(e.value).startswith(f"{tmp_path / name}.pt: ") and match in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
        assert cm_import.main([str(tmp_path / f"{name}.pt"), str(out), "--image-size", "16"]) == 2
        assert match in capsys.readouterr().err
    assert out.read_bytes() == b"an older conversion"


def test_paper_two_step_levels_are_recorded_and_used(tmp_path, monkeypatch, capsys):
    """A released consistency model's checkpoint records the paper's two-step levels (launch.sh: --ts 0,22,39 --steps
    40 for cd_imagenet64_*: the second at index 22 of the 40-level Karras grid from 80 down); cmfast-sample and
    cmfast-eval use them for --steps 2 without --sigmas, and --sigmas still wins."""
    import cmfast.cli.sample as sample_cli
    from cmfast.cli.eval import main as eval_main
    a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    assert cm_import.paper_two_step("/x/cd_imagenet64_lpips.pt") == (80.0, pytest.approx((a + 22 / 39 * (b - a)) ** 7))
    assert cm_import.paper_two_step("/x/cd_imagenet64_lpips.pt")[1] == pytest.approx(1.3823679566)
    assert cm_import.paper_two_step("/x/ct_imagenet64.pt")[1] == pytest.approx((a + 106 / 200 * (b - a)) ** 7)
    assert cm_import.paper_two_step("/x/my_model.pt") is None and cm_import.paper_two_step("edm_imagenet64_ema") is None
    sd = {k: v.float() for k, v in _openai_state().items()}
    for name in ("cd_imagenet64_l2.pt", "mine.pt"):
        torch.save(sd, tmp_path / name)
    paper, mine, teacher = (tmp_path / f"{n}.safetensors" for n in ("paper", "mine", "teacher"))
    assert cm_import.main([str(tmp_path / "cd_imagenet64_l2.pt"), str(paper), "--image-size", "16"]) == 0
    assert "two-step levels 80, 1.382" in capsys.readouterr().out
    assert cm_import.main([str(tmp_path / "mine.pt"), str(mine), "--image-size", "16", "--two-step-sigma", "2.5"]) == 0
    assert cm_import.main([str(tmp_path / "cd_imagenet64_l2.pt"), str(teacher), "--image-size", "16",
                           "--kind", "edm"]) == 0
    assert load_model(str(paper))[1]["config"]["sampling_sigmas"] == {"2": [80.0, pytest.approx(1.3823679566)]}
    assert load_model(str(mine))[1]["config"]["sampling_sigmas"] == {"2": [80.0, 2.5]}
    assert "sampling_sigmas" not in load_model(str(teacher))[1]["config"]        # a teacher samples with Heun
    for bad in ("0.001", "80"):
        assert cm_import.main([str(tmp_path / "mine.pt"), str(tmp_path / "x.safetensors"), "--image-size", "16",
                               "--two-step-sigma", bad]) == 2
        assert "between sigma_min 0.002 and sigma_max 80" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(sample_cli, "generate", lambda model, num, steps, sigmas, *a: seen.append(sigmas) or
                        __import__("numpy").zeros((num, 16, 16, 3), "uint8"))
    for ckpt, extra in ((paper, []), (paper, ["--sigmas", "80,0.5"]), (mine, []), (paper, ["--steps", "1"])):
        argv = ["--checkpoint", str(ckpt), "--num", "2", "--npz", str(tmp_path / "s.npz"), "--device", "cpu"]
        assert sample_cli.main(argv + (extra if extra else ["--steps", "2"])) == 0
    out = capsys.readouterr().out
    assert seen == [(80.0, pytest.approx(1.3823679566)), (80.0, 0.5), (80.0, 2.5), (80.0,)]
    assert out.count("from the checkpoint") == 2
    monkeypatch.setattr("cmfast.metrics.evaluate", lambda model, metric, steps=None, sigmas=None, **k:
                        {"value": 1.0, "steps": steps, "sigmas": sigmas})
    for extra, want, source in ((["--steps", "2"], [80.0, pytest.approx(1.3823679566)], "checkpoint (sampling_sigmas)"),
                                (["--sigmas", "80,0.3"], [80.0, 0.3], None)):
        assert eval_main(["--checkpoint", str(paper), "--metric", "fd-fmnist", "--device", "cpu", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert list(result["sigmas"]) == want and result.get("sigmas_from") == source


def test_student_adopts_the_teachers_time_scale():
    """cmfast-train --config cd-imagenet64 --teacher <converted edm_imagenet64_ema.pt>: the teacher reads time 1000x,
    the preset's student 1x; the student takes the teacher's scale (so it can start from its weights), and only
    where nothing else but dropout differs."""
    from cmfast.nets import adopt_time_scale, architecture
    sd = {k: v.float() for k, v in _openai_state(n=2, attn_ds=(2,), classes=5).items()}
    teacher = cm_import.infer_config(sd, img_resolution=16)       # what cm_import records for such a teacher
    student = dict(img_resolution=16, in_channels=3, label_dim=5, arch="adm", model_channels=128,
                   channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8], dropout=0.1)
    adopted = adopt_time_scale(student, teacher)
    assert adopted["noise_scale"] == 1000.0 and architecture(adopted) == architecture(teacher)
    assert "noise_scale" not in student                                      # the config given is not changed
    other = dict(student, num_blocks=1)
    assert adopt_time_scale(other, teacher) == other                         # another network: nothing adopted


def test_paper_two_step_table_is_launch_sh():
    """Every released model's two-step levels: openai/consistency_models scripts/launch.sh, "Multistep sampling"
    (--ts 0,T,last --steps N), transcribed here; the second level is the Karras grid's T-th of N (rho 7, 80 ->
    0.002), computed here in float64."""
    launch = {"cd_imagenet64_lpips": (22, 40), "cd_imagenet64_l2": (22, 40), "ct_imagenet64": (106, 201),
              "cd_bedroom256_lpips": (17, 40), "cd_bedroom256_l2": (18, 40), "ct_bedroom256": (67, 151),
              "ct_cat256": (62, 151)}
    assert set(cm_import.PAPER_TWO_STEP) == set(launch)
    for name, (t, n) in launch.items():
        a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
        want = (a + t / (n - 1) * (b - a)) ** 7
        got = cm_import.paper_two_step(f"/models/{name}.pt")
        assert got[0] == pytest.approx(80.0, rel=1e-12) and got[1] == pytest.approx(want, rel=1e-9), name
    assert cm_import.paper_two_step("/models/my_model.pt") is None


def test_a_teacher_converts_to_an_edm_checkpoint(tmp_path):
    """--kind edm writes method 'edm' (load_model then builds the EDM denoiser, and cmfast-sample runs EDM's Heun
    sampler): recorded as 'cd' the teacher came back as a consistency model."""
    sd = {k: v.float() for k, v in _openai_state(classes=0).items()}
    torch.save(sd, tmp_path / "edm_imagenet64_ema.pt")
    _, cfg = cm_import.load_cm_checkpoint(str(tmp_path / "edm_imagenet64_ema.pt"), kind="edm", img_resolution=16)
    assert cfg["method"] == "edm" and "sampling_sigmas" not in cfg
    out = tmp_path / "teacher.safetensors"
    assert cm_import.main([str(tmp_path / "edm_imagenet64_ema.pt"), str(out), "--kind", "edm",
                           "--image-size", "16"]) == 0
    model, meta = load_model(str(out))
    assert isinstance(model, cmfast.EDMDenoiser) and not isinstance(model, cmfast.ConsistencyModel)
    assert meta["config"]["method"] == "edm" and model.sigma_data == 0.5


def test_a_one_level_unetmodel_equals_unetmodel():
    """channel_mult=(1,): no level ends with an up block, so num_res_blocks is the output blocks less one (2 here);
    the converted network equals the float64 UNetModel (attention at the full 16x16)."""
    sd = {k: v.float() for k, v in _openai_state(mult=(1,), n=2, attn_ds=(1,), classes=0, seed=11).items()}
    weights, cfg = cm_import.convert(sd, img_resolution=16)
    assert (cfg["channel_mult"], cfg["num_blocks"], cfg["attn_resolutions"]) == ([1], 2, [16])
    net = cmfast.UNet(**cfg).double().eval()
    net.load_state_dict({k: v.double() for k, v in weights.items()})
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    c_noise = torch.tensor([-1.0, 0.8], dtype=torch.float64)
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        got = net(x, c_noise)
        want = _reference({k: v.double() for k, v in sd.items()}, x, 1000 * c_noise, None, set())
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_layouts_that_are_no_unetmodel_are_refused_by_name(tmp_path):
    """Each layout check says what is wrong, not a later symptom of it: a dict with a time embedding but no
    input_blocks, one with a key that is no name (an AttributeError traceback before), a sub-module that is no
    ResBlock / AttentionBlock / convolution, an input block short of the output blocks' levels (2 levels of 1 + 1
    blocks: 4 input and 4 output blocks), channel counts that are no multiples of the time embedding's input width
    (model_channels)."""
    torch.save({"time_embed.0.weight": torch.zeros(4, 2), "out.2.weight": torch.zeros(3, 2, 3, 3)},
               tmp_path / "half.pt")
    with pytest.raises(cm_import.CMCheckpointError) as e:
        cm_import.load_cm_checkpoint(str(tmp_path / "half.pt"), img_resolution=16)
    assert str(e.value) == (f"{tmp_path / 'half.pt'}: not a state dict of openai/consistency_models' UNetModel "
                            f"(no time_embed / input_blocks weights)")
    sd = {k: v.float() for k, v in _openai_state(classes=0, seed=12).items()}
    torch.save({**sd, 7: torch.zeros(1)}, tmp_path / "int.pt")      # torch.save keeps keys of any type
    with pytest.raises(cm_import.CMCheckpointError) as e:
        cm_import.load_cm_checkpoint(str(tmp_path / "int.pt"), img_resolution=16)
    assert str(e.value) == (f"{tmp_path / 'int.pt'}: not a state dict of openai/consistency_models' UNetModel "
                            f"(a key that is no weight name: 7)")
    cases = {"an unknown block layout": dict(sd, **{"input_blocks.1.1.foo.weight": torch.zeros(4)}),
             "3 input and 4 output blocks do not make a UNet of equal levels":
                 {k: v for k, v in sd.items() if not k.startswith("input_blocks.3.")},
             "channel counts [128, 256] are not multiples of model_channels 96":
                 dict(sd, **{"time_embed.0.weight": torch.zeros(512, 96)})}
    for match, state in cases.items():
        with pytest.raises(cm_import.CMCheckpointError) as e:
            cm_import.convert(state, img_resolution=16)
        assert match in str(e.value), str(e.value)


def test_resolution_defaults_to_imagenet_64_and_the_two_step_level_lies_inside_the_range(tmp_path, capsys):
    """Without --image-size (img_resolution) a file is the ImageNet 64x64 model's: attention of ds 2 is at 32x32
    (the weights cannot tell the resolution). A second two-step level must lie strictly between sigma_min 0.002 and
    sigma_max 80: at 0.002 itself the second step would be f(x, sigma_min) = x, no step."""
    sd = {k: v.float() for k, v in _openai_state(classes=0, seed=13).items()}
    cfg = cm_import.convert(sd)[1]
    assert (cfg["img_resolution"], cfg["attn_resolutions"]) == (64, [32])
    torch.save(sd, tmp_path / "m.pt")
    _, cfg = cm_import.load_cm_checkpoint(str(tmp_path / "m.pt"))
    assert (cfg["net"]["img_resolution"], cfg["net"]["attn_resolutions"]) == (64, [32])
    assert cm_import.main([str(tmp_path / "m.pt"), str(tmp_path / "m.safetensors")]) == 0
    written = load_model(str(tmp_path / "m.safetensors"))[1]["config"]["net"]
    assert (written["img_resolution"], written["attn_resolutions"]) == (64, [32])
    for bad in (0.002, 80.0):
        with pytest.raises(ValueError, match="between sigma_min 0.002 and sigma_max 80"):
            cm_import.load_cm_checkpoint(str(tmp_path / "m.pt"), img_resolution=16, two_step_sigma=bad)
    _, cfg = cm_import.load_cm_checkpoint(str(tmp_path / "m.pt"), img_resolution=16, two_step_sigma=0.0021)
    assert cfg["sampling_sigmas"] == {"2": [80.0, 0.0021]}


def test_an_image_size_the_weights_cannot_take_names_the_flag_and_the_file(tmp_path, capsys):
    """--image-size is UNet's img_resolution: a size that 2 levels cannot halve (5) or none at all (0) is one line naming
    the command's flag and the file, not the library's argument name."""
    torch.save(_openai_state(classes=0, seed=2), tmp_path / "m.pt")
    for size, why in (("5", "expected a multiple of 2 (2 resolutions, each half the last), got 5"),
                      ("0", "expected an integer >= 1, got 0")):
        capsys.readouterr()
        assert cm_import.main([str(tmp_path / "m.pt"), str(tmp_path / "o.safetensors"), "--image-size", size]) == 2
        err = capsys.readouterr().err
        assert err == f"cmfast.cm_import: error: {tmp_path / 'm.pt'}: --image-size: {why}\n"
    assert not (tmp_path / "o.safetensors").exists()


def test_resolution_from_guided_diffusions_default_multipliers_and_learned_variance_refused(tmp_path):
    """Without --image-size the levels tell the size where they are guided-diffusion's defaults for one (the LSUN
    256 models' (1, 1, 2, 2, 4, 4) came out as 64x64, attention at 8/4/2 instead of 32/16/8, silently); an explicit
    size still wins, unknown multipliers stay 64. A learn_sigma model (twice the output channels) converts as a
    network (test_import_values) but is refused as a consistency model or teacher (it failed at the first
    forward)."""
    sd = _openai_state(mc=128, mult=(1, 1, 2, 2, 4, 4), attn_ds=(8, 16, 32), classes=0, scale_shift=False)
    cfg = cm_import.infer_config(sd)
    assert (cfg["img_resolution"], cfg["attn_resolutions"], cfg["channel_mult"]) == (256, [32, 16, 8],
                                                                                       [1, 1, 2, 2, 4, 4])
    assert cm_import.infer_config(sd, 128)["attn_resolutions"] == [16, 8, 4]
    small = _openai_state(mc=128, mult=(1, 2), classes=0)
    assert cm_import.infer_config(small)["img_resolution"] == 64
    sigma = dict(small, **{"out.2.weight": torch.cat([small["out.2.weight"]] * 2),
                           "out.2.bias": torch.cat([small["out.2.bias"]] * 2)})
    assert cm_import.infer_config(sigma)["out_channels"] == 6
    torch.save(sigma, tmp_path / "sigma.pt")
    for kind in ("cm", "edm"):
        with pytest.raises(cm_import.CMCheckpointError, match="sigma.pt: 6 output channels for 3 input channels: a "
                                                              "model that also predicts its variance"):
            cm_import.load_cm_checkpoint(str(tmp_path / "sigma.pt"), kind=kind)
