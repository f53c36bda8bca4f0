"""cmfast.GraphedSampler: argument checks here; on a GPU (-m gpu) equality with eager Algorithm 1 (same noise),
fresh outputs, per-batch-size graphs, multistep, uint8 and a torch.compile'd backbone."""
import math
import types

import re

import pytest
import torch

import cmfast
import cmfast.graphed
import cmfast.sampling

SHAPE = (3, 32, 32)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(device="cpu", label_dim=0, adaptive=True):
    """The 'tiny' UNet with weights re-drawn at unit gain: EDM's 1e-5 init of the last convs makes F ~ 0, and a
    comparison of outputs that are ~ c_skip x alone could not catch a wrong network path; biases non-zero, so a
    lost or doubled one shows. adaptive=False: DDPM++'s embedding add before norm1 instead of scale / shift."""
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", label_dim=label_dim, adaptive_scale=adaptive)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif "norm" not in name:
                p.normal_(0, 0.1)
    return cmfast.ConsistencyModel(net).to(device).eval()


# ---- CPU: argument checks and the error off CUDA -------------------------------------------------------------
def test_error_off_cuda():
    model = _model()
    with pytest.raises(RuntimeError, match="CUDA") as e:
        cmfast.GraphedSampler(model, 2, SHAPE)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sigmas", [(), (0.5, 2.0), (2.0, 2.0), (100.0,), (80.0, 0.001), (float("nan"),)])
def test_bad_sigmas(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        cmfast.GraphedSampler(_model(), 2, SHAPE, sigmas=sigmas)


@pytest.mark.parametrize("shape", [(3, 32), (1, 32, 32), (3, 16, 16), (3, 32, 0), "3x32x32"])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        cmfast.GraphedSampler(_model(), 2, shape)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        cmfast.GraphedSampler(_model(), batch_size, SHAPE)


def test_bad_dtype_and_model():
    with pytest.raises(TypeError, match="dtype"):
        cmfast.GraphedSampler(_model(), 2, SHAPE, dtype=torch.int8)
    with pytest.raises(TypeError, match="ConsistencyModel or a TrigFlow model .* got Linear"):
        cmfast.GraphedSampler(torch.nn.Linear(2, 2), 2, SHAPE)


@pytest.mark.parametrize("sigmas", [(80.0,), (80.0, 2.0, 0.5)])
def test_algorithm_uncaptured_cpu(monkeypatch, sigmas):
    """The captured computation run eagerly on CPU in fp32 equals cmfast.sample (Algorithm 1) with the same
    generator draws, then the clamp; uint8 is round((y + 1) 127.5); labels reach the network."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _model(label_dim=3)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32, sigmas=sigmas)
    labels = torch.tensor([2, 0])
    out = sampler._run_uncaptured(seed=4, class_labels=labels)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn((2, *SHAPE), generator=gen)
    ref = cmfast.sample(model, z, sigmas, generator=gen, class_labels=labels).clamp(-1, 1)
    assert ref.abs().mean() > 0.1 and (ref.abs() < 1).float().mean() > 0.5   # F matters, clamp not everywhere
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    u = sampler._run_uncaptured(seed=4, class_labels=labels, uint8=True)
    assert u.dtype == torch.uint8 and torch.equal(u.float(), ((out + 1) * 127.5).round())
    other = sampler._run_uncaptured(seed=4, class_labels=torch.tensor([1, 1]))
    assert (other - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels"):
        sampler._run_uncaptured(seed=4)


def test_reload_copies_new_weights(monkeypatch):
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _model()
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32)
    before = sampler._run_uncaptured(seed=1)
    with torch.no_grad():
        model.net.out_conv.weight.mul_(-1)
    torch.testing.assert_close(sampler._run_uncaptured(seed=1), before)     # a snapshot until reload()
    sampler.reload()
    after = sampler._run_uncaptured(seed=1)
    gen = torch.Generator().manual_seed(1)
    ref = cmfast.sample(model, torch.randn((2, *SHAPE), generator=gen), generator=gen).clamp(-1, 1)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 0.1


@pytest.mark.parametrize("adaptive", [True, False], ids=["scale-shift", "pre-add"])
@pytest.mark.parametrize("sigmas", [(80.0,), (80.0, 0.5)])
def test_constants_folded_per_graph(monkeypatch, adaptive, sigmas):
    """An unconditional network's embedding path depends on sigma alone, so each graph computes the blocks'
    constants once per step. The folded run equals Algorithm 1 (fp32), and under bf16 autocast it is bit for bit
    the run that computes them inside (same ops on the same numbers); a wrong step's constants would not be."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _model(adaptive=adaptive)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32, sigmas=sigmas)
    _, g = sampler._buffers(None, False)
    sampler._prepare(g)
    assert g.consts is not None and len(g.consts) == len(sigmas) and len(g.consts[0]) == len(model.net.blocks())
    sampler.generator.manual_seed(4)
    out = sampler._run(g, g.sig, False)
    gen = torch.Generator().manual_seed(4)
    ref = cmfast.sample(model, torch.randn((2, *SHAPE), generator=gen), sigmas, generator=gen).clamp(-1, 1)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    bf = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.bfloat16, sigmas=sigmas, channels_last=False)
    _, g = bf._buffers(None, False)
    bf._prepare(g)
    with cmfast.ops.use_backend("torch"):
        bf.generator.manual_seed(4)
        folded = bf._run(g, g.sig, False)
        live, g.consts = g.consts, None
        bf.generator.manual_seed(4)
        unfolded = bf._run(g, g.sig, False)
        if len(sigmas) > 1:
            g.consts = live[::-1]                   # each step given the other step's constants
            bf.generator.manual_seed(4)
            assert (bf._run(g, g.sig, False) - unfolded).abs().max() > 1e-2
    assert torch.equal(folded, unfolded)


def test_conditional_and_compiled_networks_are_not_folded(monkeypatch):
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    sampler = cmfast.GraphedSampler(_model(label_dim=3), 2, SHAPE, dtype=torch.float32)
    _, g = sampler._buffers(None, False)
    sampler._prepare(g)
    assert g.consts is None                         # the labels change per call


def test_class_labels_are_checked_on_the_host(monkeypatch):
    """Out-of-range labels are refused before a replay: inside one, one_hot's device-side assert ends the CUDA
    context (the UNet's own range check runs for CPU tensors only). Bools and floats are not labels."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    sampler = cmfast.GraphedSampler(_model(label_dim=4), 2, SHAPE, dtype=torch.float32)
    for bad, what in (([0, 4], "0 <= label < 4, got 4"), ([-1, 2], "got -1"), ([True, False], "integer class indices"),
                      ([0.0, 1.0], "integer class indices"), ([0, 1, 2], "(2,) integer labels")):
        with pytest.raises(ValueError, match=re.escape(what)):
            sampler._run_uncaptured(class_labels=bad)
    assert sampler._run_uncaptured(class_labels=torch.tensor([3, 0])).shape == (2, *SHAPE)


def test_a_compiled_network_keeps_its_mode(monkeypatch):
    """A compiled network is the caller's own module (not a cast copy): the sampler runs it in eval mode and
    leaves its mode as it was (it had switched the caller's module to eval for good)."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _model()
    seen = []

    class Compiled(torch.nn.Module):                 # stands in for dynamo's OptimizedModule (_orig_mod)
        def __init__(self, net):
            super().__init__()
            self._orig_mod = net

        def forward(self, *a, **k):
            seen.append(self._orig_mod.training)
            return self._orig_mod(*a, **k)
    compiled = cmfast.ConsistencyModel(Compiled(model.net)).train()
    sampler = cmfast.GraphedSampler(compiled, 2, SHAPE, dtype=torch.float32)
    assert compiled.net.training
    sampler._run_uncaptured(seed=0)
    assert seen == [False] and compiled.net.training and compiled.net._orig_mod.training
    # Mixed modes come back as they were, each submodule its own (net.train(was) set them all alike).
    first, *rest = [m for m in compiled.net._orig_mod.modules() if m is not compiled.net._orig_mod]
    first.eval()
    sampler._run_uncaptured(seed=0)
    assert seen == [False, False] and not first.training and all(m.training for m in rest)


def test_reload_refreshes_folded_constants(monkeypatch):
    """reload() copies new weights into the sampler's copy and recomputes every captured graph's constants in
    place (a graph keeps the addresses it was captured with)."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _model(adaptive=False)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32)
    key, g = sampler._buffers(None, False)
    sampler._prepare(g)
    sampler._graphs[key] = g                        # as capture() keeps it
    ptrs = [t.data_ptr() for t in cmfast.graphed._flat(g.consts)]
    with torch.no_grad():
        model.net.map_layer1.bias.add_(0.5)         # reaches the output only through the folded constants
    sampler.reload()
    assert [t.data_ptr() for t in cmfast.graphed._flat(g.consts)] == ptrs
    sampler.generator.manual_seed(1)
    out = sampler._run(g, g.sig, False)
    gen = torch.Generator().manual_seed(1)
    ref = cmfast.sample(model, torch.randn((2, *SHAPE), generator=gen), generator=gen).clamp(-1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ddpmpp_batch1_launch_count():
    """The kernels a DDPM++ CIFAR-10 batch-1 replay launches, counted on CPU by benchmarks/launches.py (a model of
    the GPU's launches; batch 1 is launch-bound). 681 for the code the third GPU session profiled (711 kernels
    there), 460 before the embedding path was folded, 302 after: no GEMM of the mapping network or the blocks'
    embedding layers, no resampling filter, no add before norm1. 308 now: one copy per attention makes q, k, v dense
    (the Triton forward on the strided views cost 0.64 ms of the H200's 2.0 ms batch-1 sample, against 0.09 ms on
    dense inputs). Fails when a change adds launches back."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import launches
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.UNet.from_preset("ddpmpp-cifar10")).eval()
    counts = launches.count_sample_launches(model, 1)
    assert counts["addmm"] == 0 and counts["mm"] == 0 and counts["add"] == 0 and counts["repeat"] == 0, counts
    assert counts["cmfast.group_norm_act"] == 73 and counts["cmfast.residual"] == 39, counts
    assert counts["cmfast.group_norm_act statistics"] == 48, counts     # as the H200 profile counted
    assert counts["clone"] == counts["cmfast.attention"] == 6, counts    # one copy per attention, not three
    assert sum(counts.values()) <= 310, counts


def test_cast_copy_stores_what_autocast_would_cast():
    """The sampler's bf16 copy holds the conv / linear weights, biases and FIR filters in bf16, so autocast casts
    nothing of them per call (the H200 profile counted 145 copy kernels a batch-1 forward): under autocast the copy
    gives bit for bit the original's output (the same casts, done once), with fewer cast ops; the GroupNorm affine
    stays fp32."""
    from torch.profiler import ProfilerActivity, profile

    from cmfast.graphed import _cast_copy
    from cmfast.nets.layers import GroupNorm
    net = _model().net
    with torch.no_grad():                       # non-zero biases, so a lost or doubled bias would show
        for name, p in net.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.normal_(0, 0.1)
    twin = _cast_copy(net, torch.bfloat16, channels_last=False)
    assert all(m.weight.dtype == torch.float32 for m in twin.modules() if isinstance(m, GroupNorm))
    assert twin.enc["16x16_down"].conv0.resample_filter.dtype == torch.bfloat16
    x, s = torch.randn(2, *SHAPE), torch.rand(2)

    def run(m):
        casts = 0
        with torch.no_grad(), cmfast.ops.use_backend("torch"), \
                torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), \
                profile(activities=[ProfilerActivity.CPU]) as prof:
            out = m(x, s, None)
        casts = sum(e.name == "aten::_to_copy" for e in prof.events())
        return out, casts
    (ref, n_ref), (out, n_out) = run(net), run(twin)
    assert torch.equal(out, ref)
    biases = sum(1 for m in net.modules() if isinstance(m, (torch.nn.Linear, cmfast.nets.layers.Conv2d))
                 and m.bias is not None)
    assert n_ref - n_out >= biases, (n_ref, n_out, biases)


# ---- generate_batches: the engines of cmfast-sample and cmfast-eval -------------------------------------------
def test_engine_choice_and_its_errors():
    model = _model()
    assert cmfast.sampling.resolve_engine("auto", model) == "eager"                          # CPU
    assert cmfast.sampling.resolve_engine("auto", cmfast.EDMDenoiser(model.net)) == "eager"
    for engine, dtype, match in (("graphed", torch.float32, "needs the model on a CUDA device"),
                                 ("eager", torch.bfloat16, "the eager engine samples in float32"),
                                 ("fast", torch.float32, "engine: expected one of auto, graphed, eager"),
                                 ("eager", torch.int8, "dtype: expected")):
        with pytest.raises(ValueError, match=match) as e:
            cmfast.sampling.resolve_engine(engine, model, dtype)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="Heun"):
        cmfast.sampling.resolve_engine("graphed", cmfast.EDMDenoiser(model.net))


def _trigflow(time_input="t", label_dim=0, device="cpu"):
    """A TrigFlow model (sCT / sCD) around _model's re-drawn 'tiny' UNet."""
    from cmfast.trigflow import TrigFlowModel
    return TrigFlowModel(_model(label_dim=label_dim).net, time_input=time_input).to(device).eval()


@pytest.mark.parametrize("time_input", ["t", "1000t", "edm"])
@pytest.mark.parametrize("sigmas", [(80.0,), (80.0, 0.068), (80.0, 2.0, 0.5)])
def test_trigflow_uncaptured_equals_algorithm_1(monkeypatch, time_input, sigmas):
    """A TrigFlow model's f = cos t x_t - sin t sd B is the skip output of the negated backbone with sigma_min = 0
    and c_noise(atan(sigma / sd)) (graphed._TrigFlowAsSkip): the captured computation, run eagerly on CPU in fp32
    (folded constants), equals cmfast.sample's Algorithm 1 through the model's own forward, then the clamp. Before,
    the sampler computed it as a ConsistencyModel (max error 2.0) and refused it since."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _trigflow(time_input)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32, sigmas=sigmas)
    out = sampler._run_uncaptured(seed=4)
    gen = torch.Generator().manual_seed(4)
    ref = cmfast.sample(model, torch.randn((2, *SHAPE), generator=gen), sigmas, generator=gen).clamp(-1, 1)
    assert ref.abs().mean() > 0.1 and (ref.abs() < 1).float().mean() > 0.5   # F matters, clamp not everywhere
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # the parts each matter: the sign, the time input, sigma_min kept out of the scalings
    for attr, value in (("negate", not sampler._trig.negate), ("c_noise", lambda s: cmfast.precond
                                                                   .noise_conditioning(s) + 0.3)):
        good = getattr(sampler._trig, attr)
        monkeypatch.setattr(sampler._trig, attr, value)
        assert (sampler._run_uncaptured(seed=4) - out).abs().max() > 1e-2, attr
        monkeypatch.setattr(sampler._trig, attr, good)
    sampler._boundary = model.sigma_min
    if sigmas[-1] < 0.1:        # only a low last level feels sigma_min in c_skip / c_out
        assert (sampler._run_uncaptured(seed=4) - out).abs().max() > 1e-3


def test_trigflow_conditional_and_bf16_fold(monkeypatch):
    """Labels reach a conditional TrigFlow network (computed inside, not folded); an unconditional one's folded
    constants equal the run that computes them inside, bit for bit under bf16 autocast."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    cond = _trigflow(label_dim=3)
    sampler = cmfast.GraphedSampler(cond, 2, SHAPE, dtype=torch.float32, sigmas=(80.0, 0.5))
    labels = torch.tensor([2, 0])
    out = sampler._run_uncaptured(seed=3, class_labels=labels)
    gen = torch.Generator().manual_seed(3)
    ref = cmfast.sample(cond, torch.randn((2, *SHAPE), generator=gen), (80.0, 0.5), generator=gen,
                        class_labels=labels).clamp(-1, 1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert (sampler._run_uncaptured(seed=3, class_labels=torch.tensor([1, 1])) - out).abs().max() > 1e-3
    bf = cmfast.GraphedSampler(_trigflow(), 2, SHAPE, dtype=torch.bfloat16, sigmas=(80.0, 0.5), channels_last=False)
    _, g = bf._buffers(None, False)
    bf._prepare(g)
    assert g.consts is not None
    with cmfast.ops.use_backend("torch"):
        bf.generator.manual_seed(4)
        folded = bf._run(g, g.sig, False)
        g.consts = None
        bf.generator.manual_seed(4)
        assert torch.equal(folded, bf._run(g, g.sig, False))


def test_trigflow_models_are_graphed_on_cuda(monkeypatch):
    """auto picks the graphed engine for a TrigFlow model on a CUDA device, as for a ConsistencyModel; the EDM teacher
    and other modules stay refused."""
    from cmfast.trigflow import TrigFlowModel
    tf = _trigflow()
    on_cuda = lambda self, recurse=True: iter([types.SimpleNamespace(device=torch.device("cuda"))])  # noqa: E731
    monkeypatch.setattr(TrigFlowModel, "parameters", on_cuda)
    monkeypatch.setattr(cmfast.ConsistencyModel, "parameters", on_cuda)
    assert cmfast.sampling.resolve_engine("auto", _model()) == "graphed"       # as if on a GPU
    assert cmfast.sampling.resolve_engine("auto", tf) == "graphed"
    assert cmfast.sampling.resolve_engine("graphed", tf) == "graphed"
    assert cmfast.sampling.resolve_engine("eager", tf) == "eager"
    odd = torch.nn.Sequential(torch.nn.Linear(2, 2)).to("meta")
    monkeypatch.setattr(torch.nn.Sequential, "parameters", on_cuda, raising=False)
    with pytest.raises(ValueError, match="Sequential is not a consistency model the graphed sampler computes"):
        cmfast.sampling.resolve_engine("graphed", odd)
    assert cmfast.sampling.resolve_engine("auto", odd) == "eager"


def test_generate_batches_eager_is_batch_size_free():
    """Eager: each image's noise from CPU generators of its own (sampling.image_noise), Algorithm 1 after it: the
    images equal cmfast.sample's with those draws whatever the batch size; labels cycle through the classes."""
    from cmfast.sampling import image_noise
    model = _model(label_dim=3)
    sigmas = (80.0, 0.821)
    got = torch.cat([x for _, x in cmfast.sampling.generate_batches(model, 4, sigmas=sigmas, seed=2, batch_size=2)])
    ref = cmfast.sample(model, image_noise(2, 2, 2, SHAPE), sigmas, class_labels=torch.tensor([2, 0]),
                        noise=[image_noise(2, 2, 2, SHAPE, draw=1)])
    torch.testing.assert_close(got[2:], ref, atol=0, rtol=0)
    three = torch.cat([x for _, x in cmfast.sampling.generate_batches(model, 4, sigmas=sigmas, seed=2, batch_size=3)])
    torch.testing.assert_close(three, got, atol=1e-5, rtol=0)
    one = torch.cat([x for _, x in cmfast.sampling.generate_batches(model, 4, sigmas=sigmas, seed=2, batch_size=2,
                                                                    class_label=1)])
    assert (one - got).abs().max() > 1e-3                               # the label reaches the network
    with pytest.raises(ValueError, match="sigmas"):
        next(cmfast.sampling.generate_batches(model, 4))


def test_generate_batches_graphed_path(monkeypatch):
    """The graphed engine's batching, run uncaptured on CPU (the graph itself is GPU-tested below): one sampler at
    min(batch_size, num); each batch re-seeded with seed and its start; a short last batch runs as a full one with
    full-length labels and is cut, so the first 5 of 8 images are the 5 images asked for."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    monkeypatch.setattr(cmfast.graphed.GraphedSampler, "__call__", cmfast.graphed.GraphedSampler._run_uncaptured)
    monkeypatch.setattr(cmfast.sampling, "resolve_engine", lambda engine, model, dtype=None: "graphed")
    model = _model(label_dim=3)
    run = lambda num: torch.cat([x for _, x in cmfast.sampling.generate_batches(   # noqa: E731
        model, num, sigmas=(80.0,), seed=1, batch_size=4, engine="graphed")])
    five, eight = run(5), run(8)
    assert five.shape == (5, *SHAPE) and five.abs().max() <= 1
    torch.testing.assert_close(five, eight[:5], atol=0, rtol=0)
    sampler = cmfast.GraphedSampler(model, 4, SHAPE, dtype=torch.float32, sigmas=(80.0,))
    second = sampler._run_uncaptured(seed=1 * 1_000_003 + 4, class_labels=torch.tensor([1, 2, 0, 1]))
    torch.testing.assert_close(eight[4:], second, atol=0, rtol=0)
    assert (eight[:4] - eight[4:]).abs().mean() > 0.05                  # batches get their own noise


# ---- GPU ----------------------------------------------------------------------------------------------------
def _eager(model, z, noises, sigmas, dtype=torch.bfloat16, labels=None):
    """Algorithm 1 in eager PyTorch (fp32 model under autocast), with the given noise, then the clamp."""
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        x = model(sigmas[0] * z, sigmas[0], labels)
        for s, n in zip(sigmas[1:], noises):
            x = model(x + math.sqrt(s * s - model.sigma_min ** 2) * n, s, labels)
    return x.float().clamp(-1, 1)


def _noise(sampler, B=2, uint8=False):
    g = sampler._graphs[(B, uint8, cmfast.ops.get_backend())]
    return g.z.clone(), [n.clone() for n in g.noise]


# bf16 tolerance: outputs are O(0.5); bf16 rounding through the tiny UNet moves them by ~1e-2; a wrong noise,
# step or scaling moves them by O(0.1-1).
BF16 = dict(atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sigmas", [(80.0,), (80.0, 2.0, 0.5)])
@pytest.mark.parametrize("adaptive", [True, False], ids=["scale-shift", "pre-add"])
def test_equals_eager_same_noise(sigmas, adaptive):
    """Also the folded constants and the pre-add GroupNorm of a DDPM++-style block (adaptive=False)."""
    model = _model("cuda", adaptive=adaptive)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, sigmas=sigmas, seed=1)
    out = sampler()
    z, noises = _noise(sampler)
    assert len(noises) == len(sigmas) - 1 and out.dtype == torch.float32 and out.shape == (2, *SHAPE)
    ref = _eager(model, z, noises, sigmas)
    torch.testing.assert_close(out, ref, **BF16)
    assert (out - ref).abs().mean() < 1e-2
    assert (out - _eager(model, z, noises, sigmas, dtype=torch.float32)).abs().max() < 0.1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("time_input", ["t", "edm"])
def test_trigflow_equals_eager_same_noise(time_input):
    """A TrigFlow model (sCT / sCD) graphed in bf16 against Algorithm 1 through its own forward (VE convention)."""
    model = _trigflow(time_input, device="cuda")
    sigmas = (80.0, 0.5)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, sigmas=sigmas, seed=1)
    out = sampler()
    z, noises = _noise(sampler)
    ref = _eager(model, z, noises, sigmas)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, **BF16)
    assert (out - ref).abs().mean() < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_seed_replays_eager_generator():
    """Replay after seed=s draws what torch.randn with a fresh generator seeded s draws (graph-safe Philox)."""
    model = _model("cuda")
    sigmas = (80.0, 1.0)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, sigmas=sigmas)
    out = sampler(seed=5)
    gen = torch.Generator("cuda").manual_seed(5)
    z = torch.randn((2, *SHAPE), generator=gen, device="cuda")
    n = torch.randn((2, *SHAPE), generator=gen, device="cuda")
    torch.testing.assert_close(out, _eager(model, z, [n], sigmas), **BF16)
    torch.testing.assert_close(sampler(seed=5), out, atol=0, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_calls_differ_and_outputs_are_fresh():
    sampler = cmfast.GraphedSampler(_model("cuda"), 2, SHAPE)
    a = sampler()
    kept = a.clone()
    b = sampler()
    assert (a - b).abs().mean() > 0.05                 # new noise each replay
    torch.testing.assert_close(a, kept, atol=0, rtol=0)  # the first result was not overwritten
    assert a.data_ptr() != b.data_ptr()


@pytest.mark.gpu
@needs_cuda
def test_new_batch_size_captures_new_graph():
    model = _model("cuda")
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, seed=0)
    assert sampler().shape == (2, *SHAPE)
    out = sampler(batch_size=3)
    assert out.shape == (3, *SHAPE) and len(sampler._graphs) == 2
    z, _ = _noise(sampler, B=3)
    torch.testing.assert_close(out, _eager(model, z, [], (80.0,)), **BF16)
    assert sampler().shape == (2, *SHAPE) and len(sampler._graphs) == 2   # cached


@pytest.mark.gpu
@needs_cuda
def test_uint8_matches_float_path():
    sampler = cmfast.GraphedSampler(_model("cuda"), 2, SHAPE)
    f = sampler(seed=3)
    u = sampler(seed=3, uint8=True)
    assert u.dtype == torch.uint8 and u.shape == f.shape
    expect = ((f + 1) * 127.5).round()
    assert (u.float() - expect).abs().max() <= 1


@pytest.mark.gpu
@needs_cuda
def test_class_labels_buffer():
    model = _model("cuda", label_dim=4)
    sampler = cmfast.GraphedSampler(model, 2, SHAPE, seed=0)
    with pytest.raises(ValueError, match="class_labels"):
        sampler()
    for labels in ([0, 3], [2, 1]):
        out = sampler(class_labels=labels)
        z, _ = _noise(sampler)
        ref = _eager(model, z, [], (80.0,), labels=torch.tensor(labels, device="cuda"))
        torch.testing.assert_close(out, ref, **BF16)


@pytest.mark.gpu
@needs_cuda
def test_compiled_backbone():
    model = _model("cuda")
    compiled = cmfast.ConsistencyModel(torch.compile(model.net)).cuda().eval()
    sampler = cmfast.GraphedSampler(compiled, 2, SHAPE, sigmas=(80.0, 1.0), seed=2)
    out = sampler()
    z, noises = _noise(sampler)
    torch.testing.assert_close(out, _eager(model, z, noises, (80.0, 1.0)), **BF16)
    assert (sampler() - out).abs().mean() > 0.05


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_batches_graphed_on_cuda(dtype):
    """cmfast-sample's graphed engine on CUDA: 'auto' picks it; batches are the sampler's replays re-seeded per
    batch (deterministic); a short last batch is a full replay cut; fp32 agrees with eager Algorithm 1 on the same
    noise (both TF32 convolutions, different kernels: within 1e-2, where a wrong noise or step moves O(0.1))."""
    model = _model("cuda")
    assert cmfast.sampling.resolve_engine("auto", model) == "graphed"
    run = lambda num: torch.cat([x for _, x in cmfast.sampling.generate_batches(   # noqa: E731
        model, num, sigmas=(80.0, 0.821), seed=1, batch_size=4, dtype=dtype)])
    five, eight = run(5), run(8)
    torch.testing.assert_close(five, eight[:5], atol=0, rtol=0)
    assert five.dtype == torch.float32 and (eight[:4] - eight[4:]).abs().mean() > 0.05
    if dtype == torch.float32:
        sampler = cmfast.GraphedSampler(model, 4, SHAPE, dtype=dtype, sigmas=(80.0, 0.821))
        out = sampler(seed=1 * 1_000_003 + 4)
        z, noises = _noise(sampler, B=4)
        torch.testing.assert_close(out, eight[4:], atol=0, rtol=0)
        torch.testing.assert_close(out, _eager(model, z, noises, (80.0, 0.821), dtype=torch.float32),
                                   atol=1e-2, rtol=1e-2)


def test_model_off_cuda_is_a_value_error(monkeypatch):
    """A CUDA machine with the model left on the CPU is the caller's mistake (DESIGN: ValueError naming what came),
    not an environment without CUDA (RuntimeError, the test above)."""
    from cmfast.graphed import _cuda_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"needs the model on a CUDA device, got parameters on cpu: move it with "
                                         r"model.cuda\(\)"):
        _cuda_device(_model())
