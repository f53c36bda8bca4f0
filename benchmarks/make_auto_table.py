"""Turn measured per-op benchmark JSON (bench_cuda.py and any file with the same row format) into
cmfast/ops/auto_table.json: for each op, the backend that backend 'auto' uses on CUDA.

    python benchmarks/make_auto_table.py benchmarks/results/*-cuda-ops.json            # writes the table
    python benchmarks/make_auto_table.py results.json --out /tmp/t.json --dry-run     # prints it only

Rule: within each measured case (op, shape, layout, pass, dtype, device; one file, i.e. one process) every
choosable backend (torch = eager, triton, cuda; torch.compile is not a backend) is timed relative to the fastest of
them; an op's winner has the lowest geometric mean of those ratios over the cases where all candidates ran. The
same rule per shape class (pass fwd / fwd+bwd, layout nchw / nhwc): where a class's winner differs from the op's,
the op's entry becomes {"default": op winner, class: winner, ...}. Within each class, per batch size (small: batch <=
cmfast.ops.SMALL_BATCH, the sampler's latency path; large): where that winner differs from its class's, the entry also
gets "class/small" or "class/large" (the dispatcher looks up the most specific class first); a class measured at one
size only gets, for the other size, the winner measured at that size and pass in the op's other layouts (marked
"proxy" in the ratios) where it differs from the class's. A case where every backend also has a CUDA-graph replay
time (graph_median_ms: the GPU time alone; forward rows, and forward + backward rows where the capture works) is
judged by those times; a forward + backward case at the large size without them does not vote (its eager time is
host launch cost a GPU-bound training step hides), and a class left unmeasured at that size takes the op's winner.
Only CUDA results count, and only numbers that are in the files: nothing is filled in. A kernel rewritten since its
rows were measured does not vote with them: bench_cuda.py records each op's CUDA source digest (csrc_ops), and only
rows of the op's current sources count (files from before the digests: only while no file has measured the current
ones); the table's _meta lists the rows left out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

try:
    from cmfast.ops import SMALL_BATCH
except ImportError:      # the table can be made where cmfast is not installed; the value is cmfast.ops'
    SMALL_BATCH = 8
CHOOSABLE = ("torch", "triton", "cuda")
CASE_KEYS = ("op", "shape", "layout", "pass", "kind", "groups", "uint8")
# Inputs the network no longer passes, so their rows say nothing about what auto will run: attention on the strided
# q, k, v views of the qkv output (bench_ops until the UNet made them dense in one copy; on the H200 the Triton forward
# read them 12x slower than dense ones).
RETIRED_INPUTS = {"qkv": ("unet-nhwc-views",)}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "cmfast" / "ops" / "auto_table.json"


def superseded(results: list[dict], current: dict | None) -> set[tuple[int, str]]:
    """(file index, op) pairs whose CUDA rows do not vote: measured with other sources of the op's kernels than
    `current` (op -> cmfast._build.op_digest of the working tree; the files record theirs as csrc_ops). A file from
    before the digests were recorded votes for an op only while no file has measured the op's current sources."""
    if not current:
        return set()
    recorded = [res.get("csrc_ops") or {} for res in results]
    measured_now = {op for rec in recorded for op, d in rec.items() if d and d == current.get(op)}
    out = set()
    for i, (res, rec) in enumerate(zip(results, recorded)):
        for op in {row.get("op") for row in res.get("rows", []) if row.get("backend") == "cuda"}:
            if current.get(op) is None:
                continue
            if (rec.get(op) != current[op]) if rec.get(op) else op in measured_now:
                out.add((i, op))
    return out


def choose(results: list[dict], skip: set[tuple[int, str]] = frozenset()) -> tuple[dict, dict]:
    """(op -> backend, op -> {backend: geometric-mean ratio to the per-case best, "cases": n}). skip: (file index,
    op) pairs whose CUDA rows are left out (superseded)."""
    cases: dict[tuple, dict[str, float]] = defaultdict(dict)
    graphed: dict[tuple, dict[str, float]] = defaultdict(dict)
    for i, res in enumerate(results):
        if res.get("device_type") != "cuda":
            continue
        for row in res.get("rows", []):
            if any(row.get(k) in v for k, v in RETIRED_INPUTS.items()):
                continue
            if row.get("backend") == "cuda" and (i, row.get("op")) in skip:
                continue
            if row.get("backend") in CHOOSABLE and isinstance(row.get("median_ms"), (int, float)) \
                    and row["median_ms"] > 0:
                # timings are compared only within one file: one process, one device (DESIGN.md, Benchmarks)
                key = (i, res.get("dtype")) + tuple(json.dumps(row.get(k)) for k in CASE_KEYS)
                cases[key][row["backend"]] = row["median_ms"]
                if isinstance(row.get("graph_median_ms"), (int, float)) and row["graph_median_ms"] > 0:
                    graphed[key][row["backend"]] = row["graph_median_ms"]
    # A case whose every backend also has a graph-replay time is judged by it: the GPU time alone, which is what the
    # CUDA-graph sampler pays and what a GPU-bound training step waits for (the eager time at these sizes is mostly
    # host launch cost).
    # A forward + backward case at a training batch size ('large') without them does not vote: its eager times
    # (0.6-1.3 ms on the H200 for kernels of ~0.1 ms) are host launch cost, which a GPU-bound step hides (the H200
    # step profiles had the CUDA GroupNorm's kernels at 38.5 ms a step against Triton's 30.5, while the eager per-op
    # times ranked CUDA first). Such a class falls back to the op's winner (below).
    unvoted: set[tuple[str, str]] = set()
    for key, times in list(cases.items()):
        if set(graphed.get(key, {})) == set(times):
            cases[key] = graphed[key]
            continue
        op, pass_, layout, shape = _case(key)
        if pass_ == "fwd+bwd" and size_class(shape) == "large":
            unvoted.add((op, shape_class(pass_, layout) + "/large"))
            del cases[key]
    per_op: dict[str, list[dict[str, float]]] = defaultdict(list)
    per_class: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    per_size: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for key, times in cases.items():
        op, pass_, layout, shape = _case(key)
        per_op[op].append(times)
        per_class[op][shape_class(pass_, layout)].append(times)
        per_size[op][shape_class(pass_, layout) + "/" + size_class(shape)].append(times)
    table, stats = {}, {}
    for op, rows in sorted(per_op.items()):
        won = _winner(rows)
        if won is None:
            continue
        table[op], stats[op] = won
        # Per shape class (pass, layout) where its winner differs: e.g. the sampler's no-grad NHWC forward and
        # training's forward+backward can favour different backends (measured on an H200, group_norm_act).
        classes = {c: _winner(r) for c, r in sorted(per_class[op].items())}
        classes = {c: w for c, w in classes.items() if w is not None}
        entries = {c: w for c, w in classes.items()} if any(w[0] != table[op] for w in classes.values()) else {}
        # Per batch size within a class, where the winner differs from the class's (e.g. a kernel that wins at
        # batch 1 and loses at 256).
        for c, r in sorted(per_size[op].items()):
            w = _winner(r)
            parent = c.rsplit("/", 1)[0]
            if w is not None and w[0] != (classes[parent][0] if parent in classes else table[op]):
                entries[c] = w
        # A class measured at one batch size only: its other size takes the winner measured at that size and pass in
        # the op's other layouts, where that differs from what the lookup would inherit. Without this, the batch-8
        # winner of GroupNorm forward + backward NHWC (CUDA, measured at batch 1 and 8 only) ran at batch 256, where
        # the H200 training step measured it slower than Triton (GroupNorm kernels 38.5 against 30.5 ms a step).
        for c in sorted(classes):
            for size in ("small", "large"):
                if f"{c}/{size}" in per_size[op]:
                    continue
                pass_ = c.split("/")[0]
                near = [t for k, rs in per_size[op].items() if k.split("/")[0] == pass_ and k.endswith("/" + size)
                        for t in rs]
                w = _winner(near) if near else None
                inherited = entries.get(c, classes[c])[0]
                if w is not None and w[0] != inherited:
                    entries[f"{c}/{size}"] = (w[0], dict(w[1], proxy=f"{pass_} at batch size '{size}', other layouts"))
                elif w is None and (op, f"{c}/{size}") in unvoted and table[op] != inherited:
                    entries[f"{c}/{size}"] = (table[op], dict(stats[op], proxy=f"eager times only at batch size "
                                                                             f"'{size}': the op's winner"))
        if entries:
            stats[op] = dict(stats[op], classes={c: w[1] for c, w in entries.items()})
            table[op] = {"default": table[op], **{c: w[0] for c, w in entries.items()}}
    return table, stats


def _case(key: tuple) -> tuple:
    """(op, pass, layout, shape) of a case key: (file index, dtype, *CASE_KEYS values as JSON)."""
    return tuple(json.loads(key[2 + CASE_KEYS.index(k)]) for k in ("op", "pass", "layout", "shape"))


def size_class(shape) -> str:
    """'small' (batch <= SMALL_BATCH) or 'large', from a benchmark row's shape (batch first)."""
    return "small" if shape and int(shape[0]) <= SMALL_BATCH else "large"


def shape_class(pass_: str | None, layout: str | None) -> str:
    """The auto table's key within an op: 'fwd' or 'fwd+bwd', with '/nchw' or '/nhwc' for ops that have a layout
    (cmfast.ops' dispatcher builds the same key from the call)."""
    return f"{pass_ or 'fwd'}/{layout}" if layout else (pass_ or "fwd")


def _winner(rows: list[dict[str, float]]) -> tuple[str, dict] | None:
    """(backend, {backend: geometric-mean ratio, "cases": n}) over the cases where every candidate ran."""
    cands = [b for b in CHOOSABLE if any(b in r for r in rows)]
    full = [r for r in rows if all(b in r for b in cands)]
    if not full:
        return None
    gm = {b: math.exp(sum(math.log(r[b] / min(r.values())) for r in full) / len(full)) for b in cands}
    return min(cands, key=lambda b: (gm[b], CHOOSABLE.index(b))), dict(gm, cases=len(full))  # ties: simpler backend


def current_digests() -> dict | None:
    """op -> the digest of its CUDA sources in this checkout (cmfast/_build.py, loaded by path: it needs only the
    standard library, so the table can be made where cmfast is not installed), or None without csrc/."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "cmfast" / "_build.py"
    spec = importlib.util.spec_from_file_location("_cmfast_build_for_table", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    digests = {op: build.op_digest(op) for op in build.OP_SOURCES}
    return digests if any(digests.values()) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_auto_table", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="benchmark result JSON files")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    a = p.parse_args(argv)
    results = []
    for path in a.results:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"make_auto_table: error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    skip = superseded(results, current_digests())
    table, stats = choose(results, skip)
    if not table:
        print("make_auto_table: error: no CUDA rows with torch/triton/cuda timings in the given files", file=sys.stderr)
        return 2
    table["_meta"] = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "sources": [p.name for p in a.results],
                      "devices": sorted({r.get("device", "?") for r in results if r.get("device_type") == "cuda"}),
                      "rule": "lowest geometric mean of time / per-case fastest", "ratios": stats}
    if skip:    # CUDA rows of kernels since rewritten: what they measured no longer exists
        table["_meta"]["superseded_cuda_rows"] = sorted(f"{a.results[i].name}: {op}" for i, op in skip)
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    print(text, end="")
    if not a.dry_run:
        a.out.write_text(text)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
