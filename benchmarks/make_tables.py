"""The README's results tables, generated from the committed results JSON files (never typed by hand).

    python benchmarks/make_tables.py                    # markdown to stdout
    python benchmarks/make_tables.py --readme README.md # replace the text between each pair of markers

Summary: the headline rows of the quick runs named in SUMMARY_RUNS side by side; the continuous-time step: the runs
named in SCT_RUNS. Throughput: the newest run per device (and per --quick / full). Reference runs
(scripts/reference_runs.py): the newest per device, profile and batch, with the issue's goals checked from the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- results:begin (benchmarks/make_tables.py) -->", "<!-- results:end -->"
REFERENCE_METHODS = ("edm", "cd", "ct", "ict", "sct")     # a reference set: scripts/reference_runs.py's ORDER
REF_BEGIN, REF_END = "<!-- reference:begin (benchmarks/make_tables.py) -->", "<!-- reference:end -->"
SUM_BEGIN, SUM_END = "<!-- summary:begin (benchmarks/make_tables.py) -->", "<!-- summary:end -->"
# The summary: the headline rows of named quick runs side by side (the per-run tables show each device's newest).
SUMMARY_RUNS = (("H100", "nvidia-h100-80gb-hbm3-2026-11-26-quick.json"),
                ("H200 s3", "nvidia-h200-2026-11-26-quick.json"),
                ("H200 s4", "nvidia-h200-2026-11-26-s18-quick.json"),
                ("H200 s5", "nvidia-h200-2026-11-28-s31-quick.json"))
SUMMARY_ROWS = (("one-step sampling (CUDA graph, Triton kernels)", "sample", 1), ("one-step sampling", "sample", 256),
                ("iCT training step", "ict", 256))


def newest_per(folder: Path, benchmark: str, key, keep=None) -> list[dict]:
    """The newest result (by date) of `benchmark` per key(run) from folder/*.json, among the runs keep(run) accepts;
    other and unreadable files are skipped. Each run gets `_file`, its file name."""
    newest: dict[tuple, dict] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(run, dict) or run.get("benchmark") != benchmark:
            continue          # per-op benchmarks, baselines and other result files
        if keep is not None and not keep(run):
            continue
        run["_file"] = path.name
        k = key(run)
        if k not in newest or run["date"] > newest[k]["date"]:
            newest[k] = run
    return list(newest.values())


def load_runs(folder: Path) -> list[dict]:
    """The newest complete throughput run per (device, quick); GPU runs first. A run cut short (complete: false,
    saved row by row until a time limit stopped it) does not replace a whole one."""
    runs = newest_per(folder, "throughput", lambda r: (r["device_slug"], bool(r.get("quick"))),
                      keep=lambda r: r.get("complete") is not False)
    return sorted(runs, key=lambda r: (r["device_type"] != "cuda", r["device_slug"], r["date"]))


def _x(v) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def table(run: dict, task: str) -> list[str]:
    rows = [r for r in run["rows"] if r["task"] == task]
    if not rows:
        return []
    ref = run.get("reference_mode", "eager-bf16")
    out = [f"| net | batch | mode | median ms | images/s | vs {ref} | vs best compile | x floor |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['preset']} | {r['batch']} | {r['mode']}"
        if "median_ms" not in r:
            why = r.get("error") or "skipped: " + r.get("skipped", "")
            out.append(f"{head} | {why.replace('|', '/')} | | | | |")
            continue
        sp = r.get("speedup_vs", {})
        out.append(f"{head} | {r['median_ms']:.3f} | {r['images_per_s']:.1f} | {_x(sp.get(ref))} | "
                   f"{_x(sp.get('best-compile'))} | {_x(r.get('x_floor'))} |")
    return out


def markdown(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        c = run["ceilings"]
        lines += [f"#### {run['device']}{' (--quick)' if run.get('quick') else ''}, {run['date'][:10]}", "",
                  f"torch {run['torch']}, triton {run['triton']}, CUDA {run['cuda']}; measured ceilings "
                  f"{c['matmul_tflops']:.3g} TFLOP/s ({c['matmul_dtype']} matmul), {c['copy_gb_per_s']:.0f} GB/s "
                  f"(copy). `{run['command']}` -> `benchmarks/results/{run['_file']}`.", ""]
        for task, title in (("sample", "One-step sampling"), ("ict", "iCT training step")):
            t = table(run, task)
            if t:
                lines += [f"{title}:", ""] + t + [""]
    return "\n".join(lines).rstrip() + "\n"


def load_reference(folder: Path) -> list[dict]:
    """The newest reference_runs JSON per (device, profile, batch); GPU runs first. The batch is part of the key: the
    H200 runs at batch 256 (the shipped model's) and at batch 1024 are two settings, both shown. A partial run (some
    methods only, scripts/reference_runs.py --only) is kept in its file but is no reference set: it is not shown."""
    runs = newest_per(folder, "reference_runs", lambda r: (r["device_slug"], r["profile"], r["batch_size"]),
                      keep=lambda r: set(REFERENCE_METHODS) <= set(r.get("runs", {})))
    return sorted(runs, key=lambda r: (r["device_slug"] == "cpu", r["device_slug"], r["profile"], r["batch_size"]))


def _fd(run: dict, method: str, nfe: int):
    """The evaluation of `method` at `nfe` network evaluations at the fixed levels (the 2-step default 80, 0.821)."""
    for e in run["runs"].get(method, {}).get("evals", []):
        if e.get("nfe") == nfe:
            return e
    return None


def _searched(run: dict, method: str):
    """The 2-step evaluation at the level the reference run's search found (scripts/reference_runs.py's
    search_two_step), or None: results written before the search existed have none."""
    return (run["runs"].get(method, {}).get("sigma_search") or {}).get("eval")


def _search_note(run: dict) -> str:
    """The table's sentence on the searched 2-step level ('' for results without a search)."""
    s = next((r["sigma_search"] for r in run["runs"].values() if (r.get("sigma_search") or {}).get("eval")), None)
    if s is None:
        return ""
    rounds = f"{s['iters']} ternary round{'s' if s['iters'] != 1 else ''}"
    return (f" FD 2 steps: at the default levels (80, 0.821); searched level: at (80, the level in brackets), the best "
            f"second level of a search on FD-FMNIST of {s['num']} other samples (noise seed {s['seed']}, {rounds}), "
            f"scored on the same {run['eval_num']} samples as the other columns.")


def _parallel_note(run: dict) -> str:
    """The table's sentence on runs trained side by side (reference_runs.py --parallel; '' for sequential runs)."""
    par = run.get("parallel")
    if not par:
        return ""
    caps = ", ".join(f"{m} {c:.3g}" for m, c in par["caps_min"].items())   # a --deadline-s cap: 2.17
    def group(ms, one="{} alone"):
        return f"{', '.join(ms)} at once" if len(ms) > 1 else one.format(ms[0]) if ms else ""
    first = group(par["first"]) or group(par["then"])
    then = group(par["then"], "{}") if par["first"] and par["then"] else ""
    return (f" Trained side by side on the one device: {first}"
            + (f", then {then} after edm" if then else "")
            + f" (caps in minutes: {caps}); train img/s is each run's rate beside the others, sampling img/s was "
              "measured after the runs, one model at a time.")


def reference_markdown(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        lines += [f"#### {run['device']}, {run['profile']} profile, batch {run['batch_size']}, {run['date']}", "",
                  f"{run['preset']} net, batch {run['batch_size']}, {run['precision']}, torch {run['torch']}; "
                  f"FD-FMNIST (cmfast's offline metric, not FID) of {run['eval_num']} samples against the 60,000 "
                  f"training images. Commands in `benchmarks/results/{run['_file']}`.{_parallel_note(run)}"
                  f"{_search_note(run)}", "",
                  "| method | steps (planned) | images seen | train s | train img/s | FD 1 step | FD 2 steps "
                  "| FD 2 steps (searched level) | FD teacher, 35 evals | sampling img/s (1 step; teacher 35 evals) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, r in run["runs"].items():
            if "error" in r:
                lines.append(f"| {m} | {r['error'][:80]} ||||||||| ")
                continue
            one, two, teach, srch = _fd(run, m, 1), _fd(run, m, 2), _fd(run, m, 35), _searched(run, m)
            rate = (one or teach or {}).get("sample_img_per_s")
            cell = (lambda e: f"{e['value']:.2f}" if e else "-")
            scell = f"{srch['value']:.2f} ({srch['sigmas'][-1]:.3g})" if srch else "-"
            train_s = r.get('train_s', r['train_wall_s'])
            lines.append(f"| {m} | {r['steps']} ({r['steps_planned']}) | {r['images_seen']} | {train_s:.0f} "
                         f"| {r['train_img_per_s']:.0f} | {cell(one)} | {cell(two)} | {scell} | {cell(teach)} | "
                         f"{rate if rate is not None else '-'} |")
        lines += ["", "Goals (from the numbers above): " + "; ".join(reference_goals(run)) + ".", ""]
    return "\n".join(lines).rstrip() + "\n" if lines else "No reference run has been committed yet.\n"


def reference_goals(run: dict) -> list[str]:
    """The reference-runs issue's three goals, each 'met' or 'missed' with the numbers that decide it. The two on
    2-step scores are checked at the default levels (80, 0.821) and, for results that have it, again at the searched
    level (each line says which)."""
    out = []
    cms = [m for m in run["runs"] if m != "edm" and _fd(run, m, 1) and _fd(run, m, 2)]
    searched = [m for m in cms if _searched(run, m)]
    # (which 2-step numbers, what else the goal line must say, the methods, their 2-step evaluation)
    ways = [("default level 0.821", "", cms, lambda m: _fd(run, m, 2))]
    if searched:
        missing = sorted(set(cms) - set(searched))
        ways.append(("searched level", f"; not searched: {', '.join(missing)}" if missing else "", searched,
                     lambda m: _searched(run, m)))
    for how, extra, ms, two in (ways if cms else []):
        worse = [m for m in ms if two(m)["value"] >= _fd(run, m, 1)["value"]]
        out.append(f"2 steps ({how}{extra}) better than 1 for every method: " +
                   ("met" if not worse else f"missed ({', '.join(worse)})"))
    cd, ct = _fd(run, "cd", 1), _fd(run, "ct", 1)
    if cd and ct:
        out.append(f"CD 1-step better than CT 1-step: {'met' if cd['value'] < ct['value'] else 'missed'} "
                   f"({cd['value']:.2f} vs {ct['value']:.2f})")
    teach = _fd(run, "edm", 35)
    for how, extra, ms, two in (ways if teach else []):
        if ms:
            best = min(ms, key=lambda m: two(m)["value"])
            ratio = two(best)["value"] / teach["value"]
            out.append(f"best 2-step ({best}, {how}) within 1.5x of the teacher: "
                       f"{'met' if ratio <= 1.5 else 'missed'} ({ratio:.2f}x)")
    return out or ["not enough finished runs to check"]


def _ms(v) -> str:
    return "-" if v is None else f"{v:#.3g}".rstrip(".")     # 2.00, 53.0, 124


def summary_markdown(folder: Path, runs=SUMMARY_RUNS, rows=SUMMARY_ROWS) -> str:
    """The summary table: per headline row, cmfast's median, eager bf16's and the best torch.compile's of the same
    run, and cmfast's ratios to both, for each named run (a missing file or row: '-')."""
    docs = []
    for _, name in runs:
        try:
            docs.append(json.loads((folder / name).read_text()))
        except (OSError, json.JSONDecodeError):
            docs.append({"rows": []})
    labels = " / ".join(label for label, _ in runs)
    out = [f"| | batch | cmfast {labels} | eager bf16 | torch.compile (same run) | vs eager | vs compile |",
           "|---|---|---|---|---|---|---|"]
    for title, task, batch in rows:
        cells = {"cmfast": [], "eager": [], "compile": [], "ve": [], "vc": []}
        modes = set()
        for doc in docs:
            mine = [r for r in doc["rows"] if r.get("task") == task and r.get("batch") == batch and "median_ms" in r]
            ours = next((r["median_ms"] for r in mine if r["mode"] == "cmfast"), None)
            eager = next((r["median_ms"] for r in mine if r["mode"] == "eager-bf16"), None)
            comp = min((r for r in mine if r["mode"].startswith("compile")), key=lambda r: r["median_ms"], default=None)
            if comp is not None:
                modes.add(comp["mode"].removeprefix("compile-").removeprefix("compile"))
            cells["cmfast"].append(_ms(ours))
            cells["eager"].append(_ms(eager))
            cells["compile"].append(_ms(comp and comp["median_ms"]))
            cells["ve"].append(_x(eager / ours) if ours and eager else "-")
            cells["vc"].append(_x(comp["median_ms"] / ours) if ours and comp else "-")
        note = "".join(f" ({m})" for m in sorted(modes) if m)
        out.append(f"| {title} | {batch} | {' / '.join(cells['cmfast'])} ms | {' / '.join(cells['eager'])} ms | "
                   f"{' / '.join(cells['compile'])} ms{note} | {' / '.join(cells['ve'])} | {' / '.join(cells['vc'])} |")
    return "\n".join(out) + "\n"


SCT_BEGIN, SCT_END = "<!-- sct:begin (benchmarks/make_tables.py) -->", "<!-- sct:end -->"
# The continuous-time step table: (label, bench_sct file, the row of the default finite-difference step).
SCT_RUNS = (("H200 (Triton kernels)", "bench_sct-nvidia-h200.json", "sct-fd-triton"),
            ("H100 (auto)", "bench_sct-nvidia-h100-80gb-hbm3.json", "sct-fd"))


def sct_markdown(folder: Path, runs=SCT_RUNS) -> str:
    """benchmarks/bench_sct.py's rows: the FD step's time and peak memory against the iCT step of the same batch,
    and the torch.func.jvp step's time (sct-exact) over the FD step's."""
    out = ["| device | batch | time vs the iCT step | speedup vs the `torch.func.jvp` step | "
           "peak memory vs the iCT step |", "|---|---|---|---|---|"]
    for label, name, row in runs:
        try:
            rows = json.loads((folder / name).read_text())["rows"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
        for r in (r for r in rows if r.get("row") == row and "time_ms" in r):
            exact = next((e["time_ms"] for e in rows if e.get("row") == "sct-exact" and e.get("batch") == r["batch"]
                          and "time_ms" in e), None)
            out.append(f"| {label} | {r['batch']} | {_x(r['time_vs_ict'])} | {_x(exact and exact / r['time_ms'])} | "
                       f"{_x(r['mem_vs_ict'])} |")
    return "\n".join(out) + "\n"


def _replace(text: str, begin: str, end: str, md: str) -> str | None:
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        return None
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + md + end + rest.split(end, 1)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_tables.py", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    p.add_argument("--readme", type=Path, help="replace the text between each of this file's four marker pairs "
                   f"(summary, results, reference, sct), e.g. {BEGIN} and {END}")
    args = p.parse_args(argv)
    md, ref = markdown(load_runs(args.results)), reference_markdown(load_reference(args.results))
    summary, sct = summary_markdown(args.results), sct_markdown(args.results)
    if args.readme is None:
        sys.stdout.write(summary + "\n" + md + "\n" + ref + "\n" + sct)
        return 0
    text = args.readme.read_text()
    for begin, end, part in ((SUM_BEGIN, SUM_END, summary), (BEGIN, END, md), (REF_BEGIN, REF_END, ref),
                             (SCT_BEGIN, SCT_END, sct)):
        new = _replace(text, begin, end, part)
        if new is None:
            print(f"make_tables.py: error: {args.readme} lacks the markers {begin} ... {end}", file=sys.stderr)
            return 2
        text = new
    args.readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
