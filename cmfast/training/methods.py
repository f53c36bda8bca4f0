"""Training methods: a registry mapping a name (--method) to an object that builds the model(s) and the per-step loss.

Interface (register a new method by adding a module that calls `register(MyMethod())`, and importing that module
at the end of this one, as methods_scm.py is, or anywhere before cmfast-train parses its arguments):

    class Method:
        name: str                   # the --method value
        kind: str                   # 'cm' (sampled with cmfast.sample, Alg. 1) or 'edm' (cmfast.edm_sample)
        needs_teacher: bool         # --teacher PATH is required; models['teacher'] is an EDMDenoiser (eval, frozen)
        default_loss: str | None    # distance used when --loss is not given (None: the method has its own loss)
        defaults: dict              # method hyperparameters (cfg['method_args']) and their defaults; the CLI sets
                                    # them with dedicated flags (--num-scales, --mu, --s0, ...) or --method-arg K=V
        def wrap(self, net, cfg) -> nn.Module
            # the preconditioned model around a backbone; also used by checkpoint.load_model to rebuild it
        def build(self, net, cfg, teacher=None) -> dict[str, nn.Module]
            # {'model': trained module, optional 'target': a frozen copy saved in checkpoints, other entries
            # (e.g. 'teacher', 'lpips') are used by `loss` and not saved}
        def loss(self, models, x, step, cfg, generator, class_labels=None) -> (loss (B,) fp32, info dict)
            # per-sample loss of a local batch x (NCHW in [-1, 1]); draw every random number from `generator`
            # (seeded per step and per batch chunk, so DDP matches one process); info: numbers for stats.jsonl
            # (e.g. {'N': 18, 'mu': 0.0}). models['model'] may have a DDP-wrapped backbone (model.net).
        def after_step(self, models, step, cfg) -> None
            # after the optimizer step, e.g. the target EMA theta- <- mu theta- + (1 - mu) theta

    A method that sets `graph_safe = True` also runs with --cuda-graph (training/cuda_graph.py), which captures its
    loss and backward in one CUDA graph and replays it each step; it provides
        def graph_inputs(self, step, cfg) -> (dict[str, CPU tensor], info dict)
            # what changes with the step (the level grid of N(k), ...) as tensors of shapes fixed for the run; the
            # step copies them into its device buffers before each replay
        def graph_loss(self, models, x, inputs, cfg, class_labels=None) -> loss (B,) fp32
            # the loss of `loss`, from those buffers, with no host sync and no host-to-device copy; random numbers
            # from the default generator (a replay advances it), dropout shared through recorded masks

cfg is the resolved config (JSON, as --dry-run prints it); cfg['method_args'] holds this method's hyperparameters
with the defaults filled in, cfg['loss'] the distance, cfg['total_steps'] the schedule length K.
"""
from __future__ import annotations

import copy
import functools
import math

from torch import nn

from .. import objectives
from ..ema import ema_update_
from ..precond import ConsistencyModel, EDMDenoiser
from ..schedules import ct_schedule, ict_schedule, karras_sigmas, level_table

METHODS: dict[str, "Method"] = {}


def register(method: "Method") -> "Method":
    METHODS[method.name] = method
    return method


def get_method(name: str) -> "Method":
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _sigma_kwargs(cfg: dict) -> dict:
    return dict(sigma_data=cfg["sigma_data"], sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"])


def _schedule_steps(cfg: dict) -> int:
    """K of the CT / iCT curricula N(k): the method arg schedule_steps where given, else schedule_mult (default 1)
    times the run's total steps (which --time-budget plans at run time). A short run can then cover only the start of
    a longer curriculum, as the first H200 reference runs did by stopping at their time caps (on CPU, 600 iCT steps of
    the tiny net over three seeds, that made 2 steps at 0.821 steadier: FD-FMNIST 11.6-12.7 against 10.5-46.1;
    benchmarks/results/schedule_steps-cpu.json)."""
    a = cfg["method_args"]
    if a.get("schedule_steps") is not None:
        return int(a["schedule_steps"])
    return max(1, round(float(a.get("schedule_mult", 1.0)) * cfg["total_steps"]))


# Hyperparameters whose values have a range, checked when the config is resolved (before data, model or any file):
# name -> (test, what the message says is expected). Types are checked against each method's defaults.
RANGES = {
    "p_std": (lambda v: v > 0, "a positive standard deviation"),
    "s0": (lambda v: v >= 1, "an initial number of discretization steps >= 1"),
    "s1": (lambda v: v >= 1, "a final number of discretization steps >= 1"),
    "num_scales": (lambda v: v >= 2, "a number of noise levels >= 2"),
    "mu": (lambda v: 0 <= v < 1, "a target EMA rate in [0, 1)"),
    "mu0": (lambda v: 0 <= v < 1, "an initial target EMA rate in [0, 1)"),
    "c": (lambda v: v >= 0, "a constant >= 0 (or none for the default)"),
    "warmup_steps": (lambda v: v >= 1, "a number of steps >= 1"),
    "warmup_frac": (lambda v: 0 <= v <= 1, "a fraction of the run in [0, 1]"),
    "fd_eps": (lambda v: v > 0, "a positive relative step"),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_arg_types(args: dict, defaults: dict) -> None:
    """One-line ValueErrors for --method-arg values of the wrong kind or out of range (RANGES): a string where a
    number goes would otherwise fail inside the first training step, and s1 < s0 deep in the schedule."""
    for k, v in args.items():
        d = defaults.get(k)
        if d is None or v is None:
            pass
        elif isinstance(d, bool):
            if not isinstance(v, bool):
                raise ValueError(f"--method-arg {k}: expected true or false, got {v!r}")
        elif _number(d):
            if not _number(v) or not math.isfinite(v):
                raise ValueError(f"--method-arg {k}: expected a number, got {v!r}")
            if isinstance(d, int) and v != int(v):
                raise ValueError(f"--method-arg {k}: expected a whole number, got {v!r}")
            if isinstance(d, int):
                args[k] = v = int(v)             # 10.0 -> 10: the schedules count with it
        elif isinstance(d, str) and not isinstance(v, str):
            raise ValueError(f"--method-arg {k}: expected a name, got {v!r}")
        if k in RANGES and v is not None:
            if not _number(v):                   # a ranged value whose default is None (iCT's c)
                raise ValueError(f"--method-arg {k}: expected a number, got {v!r}")
            if not RANGES[k][0](v):
                raise ValueError(f"--method-arg {k}: expected {RANGES[k][1]}, got {v!r}")
    if _number(args.get("s0")) and _number(args.get("s1")) and args["s1"] < args["s0"]:
        raise ValueError(f"--s1 {args['s1']} is below --s0 {args['s0']}: the discretization grows from s0 to s1")


def _check_schedule_steps(args: dict) -> None:
    k, m = args.get("schedule_steps"), args.get("schedule_mult", 1.0)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"schedule_steps: expected a positive number of steps (or none), got {k!r}")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
        raise ValueError(f"schedule_mult: expected a positive number (the curriculum's length / the run's), got {m!r}")


def _table(n: int, cfg: dict, size: int, distribution: str = "uniform") -> dict:
    """The level grid of N = n levels as a schedules.level_table of `size` levels (the run's largest N); the same
    tables (not to be modified) while N stands, so a step's host work is a lookup."""
    a = cfg["method_args"]
    return _level_table(n, float(cfg["sigma_min"]), float(cfg["sigma_max"]), size, distribution,
                        float(a.get("p_mean", -1.1)), float(a.get("p_std", 2.0)))


@functools.lru_cache(maxsize=8)
def _level_table(n, sigma_min, sigma_max, size, distribution, p_mean, p_std) -> dict:
    return level_table(karras_sigmas(n, sigma_min, sigma_max), size, distribution, p_mean, p_std)


def _graph_pair_loss(models: dict, x, inputs: dict, cfg: dict, target: str, weighting: str, class_labels,
                     teacher=None, solver: str = "heun", c=None):
    """CD / CT / iCT's loss in a CUDA-graph step: the pair from the level table, dropout shared by recorded masks."""
    pair = objectives.draw_pair_table(x, inputs, teacher, solver, class_labels)
    return objectives.consistency_pair_loss(models["model"], models[target], pair, cfg["loss"], weighting, c=c,
                                            lpips_model=models.get("lpips"), class_labels=class_labels,
                                            replay="masks")


def _with_target(models: dict) -> dict:
    """Adds theta-, the target network (CM Alg. 2/3): a frozen copy of the model, updated by EMA."""
    models["target"] = copy.deepcopy(models["model"]).requires_grad_(False)
    return models


class Method:
    name, kind, needs_teacher, default_loss, defaults = "", "cm", False, None, {}
    # The step runs objectives.consistency_pair_loss: a target pass that replays the online pass's dropout masks
    # (the RNG state), which CUDA-graph compile modes cannot run with dropout (loop.check_compile).
    replays_dropout = False
    graph_safe = False      # --cuda-graph: graph_inputs and graph_loss below are defined

    def graph_refusal(self, cfg: dict) -> str | None:
        """Why --cuda-graph cannot capture this configuration of the method (one line), or None."""
        return None

    def graph_inputs(self, step, cfg) -> tuple[dict, dict]:
        return {}, {}

    def graph_loss(self, models, x, inputs, cfg, class_labels=None):
        raise NotImplementedError(f"--method {self.name} has no CUDA-graph step")

    def wrap(self, net: nn.Module, cfg: dict) -> nn.Module:
        return (EDMDenoiser if self.kind == "edm" else ConsistencyModel)(net, **_sigma_kwargs(cfg))

    def warnings(self, cfg: dict) -> list[str]:
        """Settings that run but that the method's paper advises against: one line each, logged at the start."""
        return []

    def sampling_sigmas(self, cfg: dict) -> dict | None:
        """The method's own sampling levels by step count ({"2": [sigma_max, level]}), recorded in the config
        (cfg['sampling_sigmas']) for cmfast-sample / cmfast-eval / the loop's grids; None: the defaults (ECT's
        0.821)."""
        return None

    def build(self, net: nn.Module, cfg: dict, teacher=None) -> dict:
        models = {"model": self.wrap(net, cfg)}
        if cfg.get("loss") == "lpips":      # a clear one-line error when the VGG weights are missing
            try:
                models["lpips"] = objectives.LPIPS()
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}; or train with another distance, e.g. --loss l2") from None
        if teacher is not None:
            models["teacher"] = teacher
        return models

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        raise NotImplementedError

    def after_step(self, models, step, cfg) -> None:
        pass


class EDM(Method):
    """The diffusion teacher: EDM's denoising loss (EDM eq. 8), sampled with EDM's Heun sampler."""
    name, kind, default_loss, defaults = "edm", "edm", None, {"p_mean": -1.2, "p_std": 1.2}

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        a = cfg["method_args"]
        return objectives.edm_loss(models["model"], x, generator, a["p_mean"], a["p_std"], class_labels), {}

    graph_safe = True

    def graph_loss(self, models, x, inputs, cfg, class_labels=None):
        a = cfg["method_args"]
        return objectives.edm_loss(models["model"], x, None, a["p_mean"], a["p_std"], class_labels)


class CD(Method):
    """Consistency distillation (CM Alg. 2): fixed N, a Heun step of the teacher, target EMA rate mu."""
    name, needs_teacher, default_loss = "cd", True, "lpips"
    replays_dropout = True
    defaults = {"num_scales": 18, "mu": 0.0, "solver": "heun", "weighting": "uniform"}

    def build(self, net, cfg, teacher=None):
        return _with_target(Method.build(self, net, cfg, teacher))

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        a = cfg["method_args"]
        loss = objectives.cd_loss(models["model"], models["target"], models["teacher"], x, a["num_scales"],
                                  a["solver"], cfg["loss"], generator, models.get("lpips"), class_labels,
                                  a["weighting"])
        return loss, {"N": a["num_scales"], "mu": a["mu"]}

    graph_safe = True

    def graph_inputs(self, step, cfg):
        n = cfg["method_args"]["num_scales"]
        return _table(n, cfg, n), {"N": n, "mu": cfg["method_args"]["mu"]}

    def graph_loss(self, models, x, inputs, cfg, class_labels=None):
        a = cfg["method_args"]
        return _graph_pair_loss(models, x, inputs, cfg, "target", a["weighting"], class_labels, models["teacher"],
                                a["solver"])

    def after_step(self, models, step, cfg):
        ema_update_(models["target"], models["model"], cfg["method_args"]["mu"])


class CT(Method):
    """Consistency training (CM Alg. 3) with the adaptive N(k), mu(k) of Appendix C."""
    name, default_loss = "ct", "lpips"
    replays_dropout = True
    defaults = {"s0": 2, "s1": 150, "mu0": 0.9, "weighting": "uniform", "match_reference_code": False,
                "schedule_steps": None, "schedule_mult": 1.0}

    def check_args(self, args: dict) -> None:
        _check_schedule_steps(args)

    def _schedule(self, step, cfg):
        a = cfg["method_args"]
        return ct_schedule(step, _schedule_steps(cfg), a["s0"], a["s1"], a["mu0"], a["match_reference_code"])

    def build(self, net, cfg, teacher=None):
        return _with_target(Method.build(self, net, cfg, teacher))

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        n, mu = self._schedule(step, cfg)
        loss = objectives.ct_loss(models["model"], models["target"], x, n, cfg["loss"], generator,
                                  models.get("lpips"), class_labels, cfg["method_args"]["weighting"])
        return loss, {"N": n, "mu": mu}

    graph_safe = True

    def graph_inputs(self, step, cfg):
        n, mu = self._schedule(step, cfg)
        return _table(n, cfg, cfg["method_args"]["s1"] + 1), {"N": n, "mu": mu}

    def graph_loss(self, models, x, inputs, cfg, class_labels=None):
        return _graph_pair_loss(models, x, inputs, cfg, "target", cfg["method_args"]["weighting"], class_labels)

    def after_step(self, models, step, cfg):
        ema_update_(models["target"], models["model"], self._schedule(step, cfg)[1])


class ICT(Method):
    """Improved consistency training: no EMA target, pseudo-Huber, lognormal levels, doubling N(k) (iCT)."""
    name, default_loss = "ict", "pseudo_huber"
    replays_dropout = True
    defaults = {"s0": 10, "s1": 1280, "p_mean": -1.1, "p_std": 2.0, "c": None, "schedule_steps": None,
                "schedule_mult": 1.0}

    def check_args(self, args: dict) -> None:
        _check_schedule_steps(args)

    def loss(self, models, x, step, cfg, generator, class_labels=None):
        a = cfg["method_args"]
        n = ict_schedule(step, _schedule_steps(cfg), a["s0"], a["s1"])
        loss = objectives.ict_loss(models["model"], x, n, cfg["loss"], a["c"], generator, a["p_mean"], a["p_std"],
                                   models.get("lpips"), class_labels)
        return loss, {"N": n, "mu": 0.0}

    graph_safe = True

    def graph_inputs(self, step, cfg):
        a = cfg["method_args"]
        n = ict_schedule(step, _schedule_steps(cfg), a["s0"], a["s1"])
        return _table(n, cfg, a["s1"] + 1, "lognormal"), {"N": n, "mu": 0.0}

    def graph_loss(self, models, x, inputs, cfg, class_labels=None):
        return _graph_pair_loss(models, x, inputs, cfg, "model", "icm", class_labels, c=cfg["method_args"]["c"])


for _m in (EDM(), CD(), CT(), ICT()):
    register(_m)

from . import methods_scm  # noqa: E402, F401  (registers sct, scd: any import of the registry has every built-in)
