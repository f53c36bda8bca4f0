"""clip_denoised: Algorithm 1 with each step's output clamped to [-1, 1] before it is noised again (and the
output), as openai/consistency_models' samplers do; off by default (the paper's Algorithm 1). Eager, the graphed
sampler's computation (uncaptured, on CPU), generate_batches, cmfast-eval's evaluate and the two CLIs."""
import math

import pytest
import torch

import cmfast
import cmfast.graphed
import cmfast.sampling
from cmfast.precond import EDMDenoiser

from test_graphed import SHAPE, _model

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMAS = (80.0, 2.0, 0.5)


def _by_hand(model, z, noises, clip):
    """Algorithm 1 written out, the clamp where asked."""
    with torch.no_grad():
        x = model(SIGMAS[0] * z, torch.tensor(SIGMAS[0]))
        for s, n in zip(SIGMAS[1:], noises):
            x = x.clamp(-1, 1) if clip else x
            x = model(x + math.sqrt(s * s - model.sigma_min ** 2) * n, torch.tensor(s))
    return x.clamp(-1, 1) if clip else x


def _loud(model):
    """The tiny model with its output layer scaled up: f leaves [-1, 1] at most pixels, so the clamp matters."""
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.startswith("dec") and "out" in name:
                p.mul_(8)
    return model


def test_eager_sample_clamps_every_step_where_asked():
    model = _loud(_model())
    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, *SHAPE), generator=g)
    noises = [torch.randn((2, *SHAPE), generator=g) for _ in SIGMAS[1:]]
    plain = cmfast.sample(model, z, SIGMAS, noise=noises)
    clipped = cmfast.sample(model, z, SIGMAS, noise=noises, clip_denoised=True)
    assert plain.abs().max() > 1.5                         # the model leaves [-1, 1]
    torch.testing.assert_close(plain, _by_hand(model, z, noises, False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clipped, _by_hand(model, z, noises, True), atol=1e-5, rtol=1e-5)
    # not just a final clamp: the clamped intermediate changes what the last step sees
    assert (clipped - plain.clamp(-1, 1)).abs().max() > 1e-2
    one = cmfast.sample(model, z, SIGMAS[:1], clip_denoised=True)
    torch.testing.assert_close(one, cmfast.sample(model, z, SIGMAS[:1]).clamp(-1, 1), atol=0, rtol=0)
    with pytest.raises(TypeError, match="clip_denoised: expected True or False, got 'False'"):
        cmfast.sample(model, z, SIGMAS, noise=noises, clip_denoised="False")


def test_graphed_computation_clamps_every_step_where_asked(monkeypatch):
    """The sampler's computation run uncaptured on CPU in fp32 equals the eager clip_denoised sample with the same
    generator draws; without the flag, the eager plain sample then the clamp (as before)."""
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    model = _loud(_model())
    outs = {}
    for clip in (False, True):
        sampler = cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32, sigmas=SIGMAS, clip_denoised=clip)
        out = sampler._run_uncaptured(seed=3)
        gen = torch.Generator().manual_seed(3)
        z = torch.randn((2, *SHAPE), generator=gen)
        ref = cmfast.sample(model, z, SIGMAS, generator=gen, clip_denoised=clip).clamp(-1, 1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        outs[clip] = out
    assert (outs[True] - outs[False]).abs().max() > 1e-2
    with pytest.raises(TypeError, match="clip_denoised"):
        cmfast.GraphedSampler(model, 2, SHAPE, dtype=torch.float32, sigmas=SIGMAS, clip_denoised=1)


def test_generate_batches_and_evaluate_pass_it_on_and_refuse_it_for_edm(monkeypatch):
    model = _loud(_model())
    run = lambda clip: torch.cat([x for _, x in cmfast.sampling.generate_batches(   # noqa: E731
        model, 3, sigmas=SIGMAS, seed=1, batch_size=2, engine="eager", clip_denoised=clip)])
    plain, clipped = run(False), run(True)
    assert clipped.abs().max() <= 1 and plain.abs().max() > 1.5
    assert (clipped - plain.clamp(-1, 1)).abs().max() > 1e-2
    teacher = EDMDenoiser(cmfast.UNet.from_preset("tiny"))
    with pytest.raises(ValueError, match="clip_denoised: consistency sampling's option"):
        next(cmfast.sampling.generate_batches(teacher, 2, steps=2, engine="eager", clip_denoised=True))
    from cmfast.metrics import evaluate
    seen = []
    monkeypatch.setattr(cmfast.sampling, "generate_batches", lambda *a, **k: seen.append(k) or iter(()))
    with pytest.raises(ValueError, match="clip_denoised: consistency sampling's option"):
        evaluate(teacher, "fd-fmnist", num=2, clip_denoised=True)
    with pytest.raises(TypeError, match="clip_denoised: expected True or False"):
        evaluate(model, "fd-fmnist", num=2, clip_denoised="yes")
    assert not seen                        # refused before any sampling or reference statistics


def test_cli_flag_reaches_the_sampler(monkeypatch, tmp_path, capsys):
    from cmfast.cli import eval as eval_cli
    from cmfast.cli import sample as sample_cli
    seen = []
    real = cmfast.sampling.generate_batches

    def spy(*a, **k):
        seen.append(k["clip_denoised"])
        return real(*a, **k)
    monkeypatch.setattr(cmfast.sampling, "generate_batches", spy)
    for flag in ([], ["--clip-denoised"]):
        assert sample_cli.main(["--pretrained", "fmnist", "--num", "2", "--steps", "2", "--device", "cpu",
                                "--out", str(tmp_path / "g.png"), *flag]) == 0
    assert seen == [False, True]
    with pytest.raises(SystemExit):
        eval_cli.main(["--samples", str(tmp_path / "g.png"), "--metric", "fd-fmnist", "--clip-denoised"])
    assert "--clip-denoised: --samples scores given images" in capsys.readouterr().err
