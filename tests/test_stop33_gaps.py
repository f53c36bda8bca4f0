"""Mutation-testing gaps of stop 33's changes (ops.trig_tangent_loss's tangent norm 'l2' / 'rms' and scm_loss's
tangent_norm, the half-precision TrigFlowModel, a PNG's eXIf after the image data, a dataset.json per subset): each
test here failed on a mutant of those lines that the other tests let through. Expected values come from float64
formulas written out here and from numpy arrays of the pixels written, not from the code under test."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch

from cmfast import data


# ---- a PNG's eXIf chunk after IDAT (cmfast.data._png_late_exif, _turn) ------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(a: np.ndarray) -> bytes:
    """Pillow's PNG of `a`, no metadata: signature, IHDR, IDAT..., IEND (the last 12 bytes)."""
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    raw = b.getvalue()
    assert raw[-12:] == _chunk(b"IEND", b"")
    return raw


def _tiff(entries) -> bytes:
    """A big-endian TIFF header and one IFD of (tag, SHORT value) entries: an eXIf chunk's body."""
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHIHH", tag, 3, 1, v, 0) for tag, v in entries)
    return b"MM\x00\x2a\x00\x00\x00\x08" + ifd + b"\x00\x00\x00\x00"


def _load_and_peek(tmp_path, raw: bytes):
    (tmp_path / "a.png").write_bytes(raw)
    ds = data.load_folder(str(tmp_path))
    return ds.images[0].permute(1, 2, 0).numpy(), ds.shape, data.peek_folder(str(tmp_path)).shape


def _pixels(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (4, 6, 3), dtype=np.uint8)


def test_late_exif_body_as_pillow_reads_it():
    # the helper's TIFF (with Orientation 6) is read as Pillow reads an eXIf: the other tests build on it
    from PIL import Image
    e = Image.Exif()
    e.load(b"Exif\x00\x00" + _tiff([(0x0112, 6)]))
    assert e.get(0x0112) == 6


@pytest.mark.parametrize("entries", [[], [(0x0128, 2)]], ids=["empty_ifd", "resolution_unit_only"])
def test_late_exif_without_orientation_loads_as_stored(tmp_path, entries):
    # An eXIf after IDAT that says nothing of the orientation (an IFD of no entries, or only ResolutionUnit) leaves
    # the image as stored: EXIF's default Orientation is 1. Mutants that defaulted to another orientation when the tag
    # (or the whole IFD) was absent turned these photos on their side; the existing tests' late eXIf all had one.
    a = _pixels(1)
    raw = _png(a)
    raw = raw[:-12] + _chunk(b"eXIf", _tiff(entries)) + raw[-12:]
    assert data._png_late_exif(io.BytesIO(raw)) == b"Exif\x00\x00" + _tiff(entries)    # found, so it is read
    got, shape, peeked = _load_and_peek(tmp_path, raw)
    np.testing.assert_array_equal(got, a)
    assert shape == peeked == (3, 4, 6)


def test_late_exif_at_orientation_6_turns_the_image(tmp_path):
    # the same construction with Orientation 6 does turn it (numpy's rotation: 90 degrees clockwise), so the test
    # above is not passing because late chunks are ignored
    a = _pixels(2)
    raw = _png(a)
    got, shape, peeked = _load_and_peek(tmp_path, raw[:-12] + _chunk(b"eXIf", _tiff([(0x0112, 6)])) + raw[-12:])
    np.testing.assert_array_equal(got, np.rot90(a, -1))
    assert shape == peeked == (3, 6, 4)


def test_a_file_cut_inside_a_chunk_header_after_the_image_data_loads(tmp_path):
    # IEND replaced by 3 stray bytes: Pillow decodes the image (its data is whole), and the walk, finding less than a
    # chunk header, stops with None. A mutant that unpacked a short header raised struct.error, which load_folder and
    # peek_folder reported as an unreadable image. (The existing test cut the file at a chunk boundary.)
    a = _pixels(3)
    raw = _png(a)[:-12] + b"\x00\x00\x00"
    for k in range(1, 8):
        assert data._png_late_exif(io.BytesIO(_png(a)[:-12] + b"\x00" * k)) is None
    got, shape, peeked = _load_and_peek(tmp_path, raw)
    np.testing.assert_array_equal(got, a)
    assert shape == peeked == (3, 4, 6)


def test_an_exif_chunk_after_iend_is_not_the_images(tmp_path):
    # Nothing after IEND is part of the PNG (PNG 1.5: eXIf anywhere before IEND; Pillow ignores trailing bytes): an
    # eXIf chunk appended after it, Orientation 6, leaves the image as stored. A mutant that walked on past IEND read
    # it and turned the image.
    a = _pixels(4)
    raw = _png(a) + _chunk(b"eXIf", _tiff([(0x0112, 6)]))
    assert data._png_late_exif(io.BytesIO(raw)) is None
    got, shape, peeked = _load_and_peek(tmp_path, raw)
    np.testing.assert_array_equal(got, a)
    assert shape == peeked == (3, 4, 6)



# ---- a dataset.json per subset (cmfast.data._folder_labels) -------------------------------------------------------
def test_an_image_under_no_dataset_json_is_not_labelled_by_a_subsets_names(tmp_path):
    # set/a/dataset.json names '00000/img0000.png' (relative to a/); set/00000/img0000.png itself, under no
    # dataset.json, has that same relative name. It is still unlabelled: one line naming it and a/dataset.json. A
    # mutant that looked an unowned image up in a subset's table took its class (1) silently.
    from PIL import Image
    root = tmp_path / "set"
    (root / "a" / "00000").mkdir(parents=True)
    (root / "00000").mkdir()
    rng = np.random.default_rng(0)
    for d in (root / "a" / "00000", root / "00000"):
        Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(d / "img0000.png")
    (root / "a" / "dataset.json").write_text('{"labels": [["00000/img0000.png", 1]]}')
    for fn in (data.load_folder, data.peek_folder):
        with pytest.raises(data.DataError, match=r"set: no label for 00000/img0000\.png \(under no dataset.json with "
                                                 r"labels; a/dataset.json label the others\)$"):
            fn(str(root))

# ---- ops.trig_tangent_loss's norm and scm_loss's tangent_norm ---------------------------------------------------
def _tangent_inputs(B=3, C=2, H=5, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda: torch.randn(B, C, H, W, generator=g, dtype=torch.float64)  # noqa: E731
    t = (torch.rand(B, generator=g, dtype=torch.float64) * 1.4 + 0.05).float().double()     # the op takes t in fp32
    return dict(F=rn(), x_t=rn(), dxdt=rn() * 0.5, t=t, dFdt=rn(),
                logvar=torch.randn(B, generator=g, dtype=torch.float64) * 0.3,
                weight=(torch.rand(B, generator=g, dtype=torch.float64) + 0.5).float().double())     # so is weight


def _tangent_truth(kw, r, sd, c, rms):
    """sCM Alg. 1's per-sample loss in float64, sample by sample in Python floats over numpy: g, its L2 norm (or the
    RMS, norm / sqrt(D)), ||g / (norm + c)||^2 w / (exp(logvar) D) + logvar (F - F- is zero in value)."""
    out = []
    for b in range(kw["F"].shape[0]):
        F, x, v, dF = (kw[k][b].numpy().ravel() for k in ("F", "x_t", "dxdt", "dFdt"))
        t, lv, w = (float(kw[k][b]) for k in ("t", "logvar", "weight"))
        g = -np.cos(t) ** 2 * (sd * F - v) - r * np.cos(t) * np.sin(t) * (x + sd * dF)
        size = np.sqrt(np.sum(g * g)) / (np.sqrt(g.size) if rms else 1.0)
        out.append(np.sum((g / (size + c)) ** 2) * w / (np.exp(lv) * g.size) + lv)
    return torch.tensor(out, dtype=torch.float64)


def test_trig_tangent_loss_default_norm_is_the_papers_l2():
    # Called without norm, the public op is sCM's g / (||g|| + c), not the RMS: every other test named its norm, so
    # a default of 'rms' passed them all. And the two differ by far here (D = 40).
    from cmfast import ops
    kw = _tangent_inputs()
    got = ops.trig_tangent_loss(kw["F"], kw["x_t"], kw["dxdt"], kw["t"], dFdt=kw["dFdt"], logvar=kw["logvar"],
                                weight=kw["weight"], r=0.8, sigma_data=0.5, c=0.1)
    l2 = _tangent_truth(kw, 0.8, 0.5, 0.1, rms=False)
    torch.testing.assert_close(got, l2, rtol=1e-12, atol=0)
    assert float(((_tangent_truth(kw, 0.8, 0.5, 0.1, rms=True) - kw["logvar"]) / (l2 - kw["logvar"])).min()) > 5


def test_scm_loss_names_tangent_norm_before_any_forward():
    # scm_loss checks tangent_norm itself, in one line naming its own argument, before a forward runs; without its
    # check the op refused it only after the online forward and the tangent's forwards, as 'norm: ...'
    from _small_nets import CondNet
    from cmfast.trigflow import TrigFlowModel, scm_loss
    model = TrigFlowModel(CondNet(ch=2))
    calls = []
    model.net.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"^tangent_norm: expected one of l2, rms, got 'L2'$"):
        scm_loss(model, torch.zeros(2, 2, 4, 4), tangent_norm="L2")
    assert calls == []


# ---- a TrigFlowModel in half precision (LogVarHead, scm_loss's fp32 copies, jvp.fp64_call) -----------------------
def test_logvar_head_of_a_half_model_returns_fp32_values_of_its_weights():
    # logvar (B,) is fp32 whatever the head's dtype (the docstring's promise; mutants returning the Linear's dtype
    # passed, the loss casting it): the values are the float64 formula linear(cos, sin of 2 pi f t) on the head's own
    # half weights, to half rounding
    from cmfast.trigflow import LogVarHead
    torch.manual_seed(0)
    head = LogVarHead(16)
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.3)
        head.linear.bias.fill_(0.25)
    t = torch.tensor([0.05, 0.4, 1.1, 1.5])
    for dtype in (torch.float16, torch.bfloat16):
        h = LogVarHead(16)
        h.load_state_dict(head.state_dict())
        h = h.to(dtype)
        got = h(t).detach()
        assert got.dtype == torch.float32 and got.shape == (4,)
        x = t.double()[:, None] * (2 * np.pi * h.embed.freqs.double())[None]
        feat = torch.cat([x.cos(), x.sin()], 1)
        want = feat @ h.linear.weight.detach().double().T[:, 0] + h.linear.bias.detach().double()
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert float((got.double() - want).abs().max()) < tol * float(want.abs().max())


def _f64_backbone(net, sd=0.5):
    import copy
    n64 = copy.deepcopy(net).double()
    return lambda x, s: n64(x / sd, s)          # time input 't': F(x_t / sd, t)


@pytest.mark.parametrize("made", ["model", "net"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp64"])
def test_tangent_forwards_of_a_half_model_run_on_copies_in_the_asked_precision(made, precision, monkeypatch):
    # A bf16 model's finite-difference pair at precision fp32 or tf32 runs on fp32 copies of its weights (fp64: on
    # fp64 copies): the backbone's first convolution sees those weights, and the pair equals float64 forwards of the
    # same weights to fp32 rounding. Also for a TrigFlowModel around a net made .bfloat16() alone (its logvar head
    # fp32): the net's dtype decides. Mutants that covered 'fp32' only, read the head's dtype, or gave fp64 copies at
    # fp32 passed the other tests (those ran precision 'fp32' on a model made .half() as a whole, by values only).
    from _small_nets import CondNet
    from cmfast import ops
    from cmfast.trigflow import TrigFlowModel, sct_loss
    net = CondNet(ch=2, seed=1)
    model = TrigFlowModel(net.bfloat16()) if made == "net" else TrigFlowModel(net).bfloat16()
    seen, real = {}, ops.trig_tangent_loss
    monkeypatch.setattr(ops, "trig_tangent_loss", lambda F, x_t, dxdt, t, **kw: seen.update(kw, x_t=x_t, dxdt=dxdt, t=t)
                        or real(F, x_t, dxdt, t, **kw))
    weights = []
    model.net.conv1.register_forward_pre_hook(lambda m, a: weights.append(m.weight.dtype))
    x0 = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    loss = sct_loss(model, x0, warmup_steps=0, precision=precision, generator=torch.Generator().manual_seed(3))
    want_dtype = torch.float64 if precision == "fp64" else torch.float32
    assert weights == [torch.bfloat16, want_dtype]          # the online forward, then the pair's one forward of 2B
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss).all())
    f64 = _f64_backbone(model.net)
    x_t, v, t, h = (seen[k].double() for k in ("x_t", "dxdt", "t", "h"))
    hb = h.view(-1, 1, 1, 1)
    for got, want in ((seen["F_plus"], f64(x_t + hb * v, t + h)), (seen["F_minus"], f64(x_t - hb * v, t - h))):
        assert float((got.double() - want).norm() / want.norm()) < 2e-5


def test_fp64_call_copies_float_buffers_and_keeps_integer_ones():
    # fp64_call(module, dtype): float parameters AND buffers in dtype (a fixed filter kept as a buffer, as EDM's
    # resampling filter, met a float64 input as fp32: 'expected the same dtype'), integer buffers as they are (an
    # index cast to float fails to index); the module itself unchanged
    import torch.nn.functional as nnf
    from torch import nn
    from cmfast.jvp import fp64_call

    class Filt(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kernel", torch.tensor([[[[1.0, 2.0, 1.0]]]]) / 3)
            self.register_buffer("order", torch.tensor([1, 0]))
            self.scale = nn.Parameter(torch.tensor(0.7))

        def forward(self, x):
            return nnf.conv2d(x[:, self.order], self.kernel.expand(2, 1, 1, 3), groups=2) * self.scale

    m = Filt().half()
    x = torch.randn(2, 2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float64, torch.float32):
        got = fp64_call(m, dtype)(x.to(dtype))
        assert got.dtype == dtype
        k = m.kernel.double()[0, 0, 0]              # the module's own (half) values, in float64
        xs = x[:, [1, 0]]
        want = (k[0] * xs[..., :-2] + k[1] * xs[..., 1:-1] + k[2] * xs[..., 2:]) * m.scale.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    assert m.kernel.dtype == torch.float16 and m.order.dtype == torch.int64


@pytest.mark.triton_cpu
def test_exact_jvp_at_fp64_under_the_triton_backend():
    # jvp 'exact' with fp64 forwards gives a float64 dF/dt; scm_loss hands the op fp32 (the kernels refuse float64):
    # under backend 'triton' a mutant passing dFdt as it came raised, under 'auto' (every other test) it went to torch.
    # The loss equals the torch backend's.
    pytest.importorskip("triton")
    from _small_nets import CondNet
    from cmfast import ops
    from cmfast.trigflow import TrigFlowModel, sct_loss
    model = TrigFlowModel(CondNet(ch=2, seed=2))
    x0 = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
    out = {}
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            out[backend] = sct_loss(model, x0, jvp="exact", precision="fp64", warmup_steps=0,
                                    generator=torch.Generator().manual_seed(5)).detach()
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-7)
