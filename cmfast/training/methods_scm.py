"""Continuous-time consistency models as training methods: --method sct | scd (sCM, Lu & Song 2024).

Registered into cmfast.training.methods (imported from cmfast/training/__init__.py). The model is a
cmfast.trigflow.TrigFlowModel, callable in the VE convention, so the loop's sampler (cmfast.sample, Alg. 1) and
every checkpoint consumer work unchanged. theta- = stopgrad(theta): no target network, no EMA target.
"""
from __future__ import annotations

import math

import torch

from ..jvp import DEFAULT_EPS, DEFAULT_ORDER, DEFAULT_PRECISION, PRECISIONS, check_order
from ..trigflow import T_MID, TrigFlowModel, check_prior_weighting, check_tangent_norm, scm_loss, tangent_warmup
from .methods import Method, register


class SCT(Method):
    """Continuous-time consistency training: TrigFlow, tangent warm-up, normalization, adaptive weighting."""
    name, kind, default_loss = "sct", "cm", None
    defaults = {"p_mean": -1.0, "p_std": 1.4,          # tan(t) = exp(tau) / sd, tau ~ N(p_mean, p_std^2)
                "warmup_steps": 10_000,                # r: 0 -> 1 over this many steps
                "warmup_frac": 0.0,                    # > 0: over this fraction of K instead (--time-budget runs)
                "c": 0.1,                              # tangent normalization g / (||g|| + c)
                "tangent_norm": "l2",                  # ||g|| ('l2', the paper's) or RMS(g) ('rms', FastGen's)
                "jvp": "fd",                           # 'fd' (finite difference) or 'exact' (torch.func.jvp)
                "fd_precision": DEFAULT_PRECISION,     # forwards of the finite difference: fp64/fp32/tf32/bf16/fp16
                "fd_eps": DEFAULT_EPS,                 # step h = fd_eps * max(t, floor)
                "fd_order": DEFAULT_ORDER,             # points of the central difference: 2 (forward of 2B) or 4 (4B)
                "time_input": "t",                     # c_noise(t): 't', '1000t', or 'edm' (EDM weights as is)
                "prior_weighting": "none"}             # w(t): 'none' (1) or 'inv_sigma' (1 / (sd tan t))

    def check_args(self, args: dict) -> None:
        """One-line ValueErrors for bad JVP settings, raised when the config is resolved (before any data/model)."""
        if args["jvp"] not in ("fd", "exact"):
            raise ValueError(f"jvp: expected 'fd' or 'exact', got {args['jvp']!r}")
        if args["fd_precision"] not in PRECISIONS:
            raise ValueError(f"fd_precision: expected one of {', '.join(PRECISIONS)}, got {args['fd_precision']!r}")
        check_order(args["fd_order"], "fd_order")
        check_prior_weighting(args["prior_weighting"])
        check_tangent_norm(args["tangent_norm"])
        if not 0.0 <= float(args["warmup_frac"]) <= 1.0:
            raise ValueError(f"warmup_frac: expected a fraction of the steps in [0, 1], got {args['warmup_frac']!r}")

    def warnings(self, cfg) -> list[str]:
        """The sCM paper (Sec. 4.1, Fig. 4) finds a Fourier time embedding of large scale (NCSN++'s, EDM's scale 16)
        unstable for continuous-time training: dF/dt grows with the scale. A positional embedding is its choice."""
        if (cfg.get("net") or {}).get("embedding_type") == "fourier":
            return [f"--method {self.name} with the Fourier time embedding of preset {cfg['preset']}: the sCM paper "
                    "(Sec. 4.1) finds large Fourier scales unstable for continuous-time training; a positional "
                    "embedding (e.g. ddpmpp-cifar10) is its choice"]
        return []

    def sampling_sigmas(self, cfg):
        """Two steps at the sCM paper's intermediate time t = 1.1: VE level sigma_data * tan(1.1) (0.982 at 0.5),
        not ECT's 0.821."""
        return {"2": [float(cfg["sigma_max"]), float(cfg["sigma_data"]) * math.tan(T_MID)]}

    def wrap(self, net, cfg):
        return TrigFlowModel(net, cfg["sigma_data"], cfg["sigma_min"], cfg["sigma_max"],
                             time_input=cfg["method_args"]["time_input"])

    @staticmethod
    def warmup_steps(cfg) -> int:
        """The tangent warm-up's length: warmup_frac of K where given (> 0), else warmup_steps."""
        a = cfg["method_args"]
        frac = float(a["warmup_frac"])
        return max(1, round(frac * cfg["total_steps"])) if frac > 0 else a["warmup_steps"]

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        a = cfg["method_args"]
        warmup = self.warmup_steps(cfg)
        loss = scm_loss(models["model"], x, models.get("teacher"), step, warmup, a["jvp"],
                        a["fd_precision"], a["fd_eps"], p_mean=a["p_mean"], p_std=a["p_std"], c=a["c"],
                        generator=generator, class_labels=class_labels, order=a["fd_order"],
                        prior_weighting=a["prior_weighting"], tangent_norm=a["tangent_norm"])
        return loss, {"r": tangent_warmup(step, warmup)}

    graph_safe = True

    def graph_refusal(self, cfg) -> str | None:
        if cfg["method_args"]["jvp"] != "fd":
            return "--method-arg jvp=exact (torch.func.jvp) is not captured; use jvp=fd (the default)"
        return None

    def graph_inputs(self, step, cfg):
        r = tangent_warmup(step, self.warmup_steps(cfg))
        return {"r": torch.tensor([r], dtype=torch.float32)}, {"r": r}

    def graph_loss(self, models, x, inputs, cfg, class_labels=None):
        a = cfg["method_args"]
        return scm_loss(models["model"], x, models.get("teacher"), 0, 1, a["jvp"], a["fd_precision"], a["fd_eps"],
                        p_mean=a["p_mean"], p_std=a["p_std"], c=a["c"], class_labels=class_labels,
                        order=a["fd_order"], prior_weighting=a["prior_weighting"], tangent_norm=a["tangent_norm"],
                        r=inputs["r"])


class SCD(SCT):
    """Continuous-time consistency distillation from an EDM teacher (--teacher, a --method edm run). With
    time_input 'edm' (the default) the student copies the teacher's weights and starts as the teacher's velocity.
    That input, c_noise = ln(sd tan t) / 4, is the one the sCM paper (Sec. 4.1) finds unstable: dc_noise/dt =
    1 / (4 sin t cos t) grows near both ends (83 at t = 0.003). The stencil stays inside (0, pi/2); time_input 't' is
    the paper's choice when the student does not start from the teacher."""
    name, needs_teacher = "scd", True
    defaults = {**SCT.defaults, "time_input": "edm"}


for _m in (SCT(), SCD()):
    register(_m)
