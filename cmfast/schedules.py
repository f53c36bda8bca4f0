"""Noise levels, curricula and noise-level sampling: each formula written once, imported everywhere."""
from __future__ import annotations

import functools
import math
import operator

import torch


def as_integer(v) -> int | None:
    """v as a Python int when it is an integer of any kind (numpy's, a 0-d integer tensor), else None: numpy's
    np.int64(5) was refused as 'expected an integer >= 2, got 5'."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and (v.is_floating_point() or v.numel() != 1)):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def as_number(v) -> float | None:
    """v as a Python float when it is a real number of any kind (numpy's, a 0-d tensor), else None: a string too,
    which float() would read ('20' as 20.0)."""
    if isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        return None


# ---- Karras et al. (EDM eq. 5), CM paper Sec. 5 discretization ------------------------------------------------
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """t_i = (smin^(1/rho) + (i-1)/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho, i = 1..N: float64, ASCENDING,
    [0] == sigma_min and [-1] == sigma_max exactly."""
    k = as_integer(n)
    if k is None or k < 2:
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    n = k
    try:    # a string failed as "'<' not supported between instances of 'int' and 'str'"
        ok = 0 < sigma_min < sigma_max < math.inf and 0 < rho < math.inf     # nan and inf too: NaN / inf levels
    except TypeError:
        raise TypeError(f"sigma_min, sigma_max, rho: expected numbers, got {sigma_min!r}, {sigma_max!r}, "
                        f"{rho!r}") from None
    if not ok:
        raise ValueError(f"expected 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (a + i * (b - a)) ** rho
    s[0], s[-1] = sigma_min, sigma_max
    return s


@functools.lru_cache(maxsize=16)
def _karras_on(n: int, sigma_min: float, sigma_max: float, rho: float, device: torch.device) -> torch.Tensor:
    return karras_sigmas(n, sigma_min, sigma_max, rho).to(device)


def karras_sigmas_on(device, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     rho: float = 7.0) -> torch.Tensor:
    """karras_sigmas on `device`: the host's float64 grid, copied there once per (grid, device) and then shared (do not
    write to it). The training losses draw every step's pair from it: a host-to-device copy of pageable memory each
    step would wait for the device's queue, a host sync in the middle of an eager GPU step."""
    device, k = torch.device(device), as_integer(n)
    if device.type == "cpu" or k is None:       # (k None: karras_sigmas says what is wrong with n)
        return karras_sigmas(n, sigma_min, sigma_max, rho).to(device)
    return _karras_on(k, sigma_min, sigma_max, rho, device)


def _check_steps(step, total_steps) -> None:
    """0 <= step and 0 < total_steps < inf, numbers: NaN failed as 'cannot convert float NaN to integer' (or gave
    ict_schedule a NaN N), an infinite total gave N = s0 at every step, a string failed in a comparison."""
    try:
        ok = step >= 0 and 0 < total_steps < math.inf
    except TypeError:
        raise TypeError(f"step, total_steps: expected numbers, got step={step!r}, total_steps={total_steps!r}") \
            from None
    if not ok:
        raise ValueError(f"expected 0 <= step and total_steps > 0, got step={step}, total_steps={total_steps}")


def _check_s0_s1(s0, s1) -> None:
    """1 <= s0 <= s1 < inf: s0 = 0 divided by zero in ict_schedule, s1 < s0 was a 'math domain error', ct_schedule
    gave an EMA rate mu > 1 for a negative s0, and an infinite s1 failed converting infinity to an integer."""
    try:
        ok = 1 <= s0 <= s1 < math.inf
    except TypeError:
        raise TypeError(f"s0, s1: expected numbers, got s0={s0!r}, s1={s1!r}") from None
    if not ok:
        raise ValueError(f"s0, s1: expected 1 <= s0 <= s1 (discretization steps, growing from s0 to s1), got "
                         f"s0={s0!r}, s1={s1!r}")


# ---- CM paper Appendix C: adaptive N(k) and mu(k) for consistency training ------------------------------------
def ct_schedule(step: int, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9,
                match_reference_code: bool = False) -> tuple[int, float]:
    """(N, mu) at training step k of K: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1,
    mu(k) = exp(s0 log(mu0) / N(k)), and mu = 0 for mu0 = 0 (its limit: the target is the online network, as in
    iCT). openai/consistency_models divides by N(k) - 1 instead (match_reference_code=True)."""
    _check_steps(step, total_steps)
    _check_s0_s1(s0, s1)
    try:
        ok = 0.0 <= mu0 <= 1.0
    except TypeError:
        raise TypeError(f"mu0: expected a number, got {mu0!r}") from None
    if not ok:
        raise ValueError(f"mu0: expected a rate in [0, 1], got {mu0}")
    k = min(step, total_steps)
    n = math.ceil(math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    n = max(n, 2)
    mu = 0.0 if mu0 == 0 else math.exp(s0 * math.log(mu0) / ((n - 1) if match_reference_code else n))
    return n, mu


# ---- iCT (Song & Dhariwal 2023, Sec. 3.4): doubling curriculum ------------------------------------------------
def ict_schedule(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    _check_steps(step, total_steps)
    _check_s0_s1(s0, s1)
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    k_prime = max(k_prime, 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


# ---- iCT Sec. 3.5: lognormal distribution over discrete levels ------------------------------------------------
def lognormal_level_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(n) for the pair (sigmas[n], sigmas[n+1]), n = 0..N-2 (ascending sigmas), proportional to
    erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std)); float64, sums to 1."""
    s = sigmas.double()
    e = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return p / p.sum()


def sample_level_indices(sigmas: torch.Tensor, batch: int, distribution: str = "uniform", generator=None,
                         p_mean: float = -1.1, p_std: float = 2.0, device=None) -> torch.Tensor:
    """Indices n (batch,) of adjacent pairs (sigmas[n], sigmas[n+1]): 'uniform' (CM paper, n ~ U{1..N-1}) or
    'lognormal' (iCT)."""
    n_pairs = sigmas.numel() - 1
    dev = generator.device if generator is not None else (device or torch.device("cpu"))
    if distribution == "uniform":
        idx = torch.randint(0, n_pairs, (batch,), generator=generator, device=dev)
    elif distribution == "lognormal":
        probs = lognormal_level_probs(sigmas, p_mean, p_std).to(dev)     # a device grid: computed there
        idx = torch.multinomial(probs, batch, replacement=True, generator=generator)
    else:
        raise ValueError(f"distribution: expected 'uniform' or 'lognormal', got {distribution!r}")
    return idx.to(device) if device is not None else idx


def level_table(sigmas: torch.Tensor, size: int, distribution: str = "uniform", p_mean: float = -1.1,
                p_std: float = 2.0) -> dict[str, torch.Tensor]:
    """The pair grid of sample_level_indices as tensors of a fixed size, for a step captured in a CUDA graph
    (cmfast-train --cuda-graph), whose grid N(k) changes while its tensors' shapes may not: 'sigmas' (size,) fp32,
    the ascending levels then sigma_max repeated; 'cdf' (size - 1,) float64, the pairs' cumulative probabilities
    (uniform or iCT's lognormal), flat after the last pair; 'last' () int64, the last pair's index. CPU tensors: the
    host fills them, the step copies them into its device buffers before each replay."""
    n = sigmas.numel()
    if n < 2 or n > size:
        raise ValueError(f"level_table: expected 2 to {size} levels, got {n}")
    if distribution == "uniform":
        p = torch.ones(n - 1, dtype=torch.float64)
    elif distribution == "lognormal":
        p = lognormal_level_probs(sigmas, p_mean, p_std)
    else:
        raise ValueError(f"distribution: expected 'uniform' or 'lognormal', got {distribution!r}")
    s = torch.full((size,), float(sigmas[-1]), dtype=torch.float32)
    s[:n] = sigmas.float()
    cdf = torch.zeros(size - 1, dtype=torch.float64)
    cdf[:n - 1] = p.double().cumsum(0)
    cdf[n - 1:] = cdf[n - 2]
    return {"sigmas": s, "cdf": cdf, "last": torch.tensor(n - 2, dtype=torch.int64)}


def sample_table_indices(cdf: torch.Tensor, last: torch.Tensor, batch: int) -> torch.Tensor:
    """Indices n (batch,) of pairs drawn with level_table's probabilities, on cdf's device without a host sync or a
    data-dependent shape (inverse-CDF sampling, capturable in a CUDA graph): n = #{i: cdf[i] <= u cdf[-1]},
    u ~ U[0, 1) from the default generator (a CUDA graph's replays advance it)."""
    u = torch.rand(batch, device=cdf.device, dtype=torch.float64) * cdf[-1]
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last)


def paper_step_sigmas(ts, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> tuple:
    """Paper-style sampling indices (openai/consistency_models 'ts', e.g. 0,22,39 with N = 40, index 0 = sigma_max)
    into a Karras grid of n levels -> the decreasing sigmas for cmfast.sample."""
    grid = karras_sigmas(n, sigma_min, sigma_max, rho).flip(0)
    out = []
    ts_list = ts.tolist() if hasattr(ts, "tolist") else ts      # a numpy array or tensor of indices too
    if not hasattr(ts_list, "__iter__"):                         # 0: "'int' object is not iterable"
        raise TypeError(f"ts: expected a sequence of step indices (e.g. [0, 22, 39]), got {ts!r}")
    ts_list = list(ts_list)
    if not ts_list:                 # () went on to cmfast.sample's 'expected at least one noise level'
        raise ValueError("ts: expected one or more step indices, got none")
    for t in ts_list:
        i = as_integer(t)
        if i is None or not 0 <= i < n:
            raise ValueError(f"ts: expected integers in [0, {n - 1}], got {t!r}")
        out.append(float(grid[i]))
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError(f"ts: expected strictly increasing indices, got {list(ts)}")
    return tuple(out)
