"""The README's results tables, generated from the committed throughput JSON files (never typed by hand).

    python benchmarks/make_tables.py                    # markdown to stdout
    python benchmarks/make_tables.py --readme README.md # replace the text between the results markers

Takes the newest run per device (and per --quick / full) from benchmarks/results/*.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- results:begin (benchmarks/make_tables.py) -->", "<!-- results:end -->"


def load_runs(folder: Path) -> list[dict]:
    """The newest throughput run per (device, quick), by date; baselines and other JSON are skipped."""
    newest: dict[tuple, dict] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(run, dict) or run.get("benchmark") != "throughput":
            continue          # per-op benchmarks, baselines and other result files
        run["_file"] = path.name
        key = (run["device_slug"], bool(run.get("quick")))
        if key not in newest or run["date"] > newest[key]["date"]:
            newest[key] = run
    return sorted(newest.values(), key=lambda r: (r["device_type"] != "cuda", r["device_slug"], r["date"]))


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_tables.py", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    p.add_argument("--readme", type=Path, help=f"write into this file between {BEGIN} and {END}")
    args = p.parse_args(argv)
    md = markdown(load_runs(args.results))
    if args.readme is None:
        sys.stdout.write(md)
        return 0
    text = args.readme.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        print(f"make_tables.py: error: {args.readme} lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    args.readme.write_text(head + BEGIN + "\n" + md + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
