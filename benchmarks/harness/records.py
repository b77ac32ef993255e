"""Result rows and what is made of them: CSV files (append, read back), the printed and markdown
tables, the plot, ``save``, and the summaries of recorded runs (``summarize``, ``compare_variants``)."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import sys
from typing import Sequence

from .environment import device_tag, env_record
from .shapes import Case


# -------------------------------------------------------------------------------------------- records

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


CSV_COLUMNS = (
    "date", "bench", "case", "shape", "mode", "provider", "status", "ms", "gbps", "tflops", "items_per_s",
    "items_unit", "peak_mb", "first_ms", "host_ms", "gpu_ms", "speedup", "bytes", "flops", "dtype", "quick", "note",
    "device", "torch", "triton", "cuda", "driver", "xformers", "python", "commit", "host", "triton_interpret",
)

_ENV: dict = {}


def new_row(provider: str, case: Case, mode: str, args) -> dict:
    if not _ENV:
        _ENV.update(env_record(args.device))
    row = {c: None for c in CSV_COLUMNS}
    row.update(_ENV)
    row.update(bench=getattr(args, "bench_name", ""), case=case.name, shape=case.shape_text(), mode=mode,
               provider=provider, dtype=str(args.dtype).replace("torch.", ""), quick=bool(args.quick),
               items_unit=case.items_unit if case.items else None)
    return row


def is_timing(row: dict) -> bool:
    """An ok row that is a real timing (not a Triton-interpreter smoke run)."""
    return row["status"] == "ok" and not (row.get("note") or "").startswith("TRITON_INTERPRET")


def add_speedups(rows: list[dict], baseline: str) -> None:
    base = {(r["case"], r["mode"]): r["ms"] for r in rows if r["provider"] == baseline and is_timing(r)}
    for r in rows:
        b = base.get((r["case"], r["mode"]))
        if is_timing(r) and b:
            r["speedup"] = b / r["ms"]


def append_csv(rows: Sequence[dict], path: str) -> None:
    """Appends rows to ``path``; a file with another header is moved aside (``.old-<date>``) first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(CSV_COLUMNS):
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            os.replace(path, f"{path}.old-{stamp}")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The result table (ok and error rows; skipped providers are listed once below it, with reasons)."""
    shown = [r for r in rows if r["status"] != "skipped"]
    has = {k: any(r.get(k) is not None for r in shown)
           for k in ("gbps", "tflops", "items_per_s", "host_ms", "gpu_ms", "speedup")}
    on_gpu = any(r.get("peak_mb") is not None for r in shown)
    units = sorted({r["items_unit"] for r in shown if r.get("items_unit")})
    header = ["case", "mode", "provider", "ms"]
    if has["gbps"]:
        header.append("GB/s")
    if has["tflops"]:
        header.append("TFLOP/s")
    if has["items_per_s"]:
        header.append(f"{'/'.join(units) or 'items'}/s")
    header += ["peak MiB", "first ms"]
    if has["host_ms"]:
        header.append("host ms")
    if has["gpu_ms"]:
        header.append("GPU ms")
    if has["speedup"]:
        header.append("speed-up")
    header.append("note")
    lines = []
    for r in shown:
        ok = r["status"] == "ok"
        cells = [r["case"], r["mode"], r["provider"], _fmt(r["ms"]) if ok else r["status"]]
        if has["gbps"]:
            cells.append(_fmt(r.get("gbps")))
        if has["tflops"]:
            cells.append(_fmt(r.get("tflops")))
        if has["items_per_s"]:
            cells.append(_fmt(r.get("items_per_s")))
        cells.append(_fmt(r.get("peak_mb"), 4) if r.get("peak_mb") is not None else ("n/a" if not on_gpu else ""))
        cells.append(_fmt(r.get("first_ms")))
        if has["host_ms"]:
            cells.append(_fmt(r.get("host_ms")))
        if has["gpu_ms"]:
            cells.append(_fmt(r.get("gpu_ms")))
        if has["speedup"]:
            cells.append(f"{r['speedup']:.2f}x" if r.get("speedup") else "")
        cells.append(r.get("note") or "")
        lines.append([str(c) for c in cells])
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["provider"], r["note"]), []).append(r["case"])
    out = []
    if markdown:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(" --- " for _ in header) + "|")
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in lines]
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
        widths[-1] = 0  # the note column is not padded
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        out.append("  ".join("-" * max(w, 4) for w in widths).rstrip())
        out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines]
    if not lines:
        out.append("(no provider could run)")
    for (prov, why), cases in skipped.items():
        where = "all cases" if len(set(cases)) == len({r["case"] for r in rows}) else ", ".join(dict.fromkeys(cases))
        out.append(("- " if markdown else "") + f"skipped {prov} ({where}): {why}")
    return "\n".join(out)


def env_header(rows: Sequence[dict], markdown: bool = True) -> str:
    if not rows:
        return ""
    r = rows[0]
    fields = ["date", "device", "torch", "triton", "cuda", "driver", "xformers", "python", "commit", "dtype", "quick"]
    text = ", ".join(f"{k} {r[k]}" for k in fields if r.get(k) not in (None, ""))
    if r.get("triton_interpret") not in (None, "", "0"):
        text += ", TRITON_INTERPRET=1 (Triton rows are smoke tests, not timings)"
    if not any(x.get("peak_mb") is not None for x in rows):
        text += ", peak memory n/a on CPU"
    return text


def plot(rows: Sequence[dict], path: str, title: str) -> str | None:
    """One bar chart per mode: median ms per case, one bar per provider (interpreter smoke runs left out).
    Returns the path, or None."""
    ok = [r for r in rows if is_timing(r)]
    if not ok:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in ok))
    cases = list(dict.fromkeys(r["case"] for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(5.0, 1.2 * len(cases) * len(provs) ** 0.5) * len(modes), 4.2),
                             squeeze=False)
    width = 0.8 / max(len(provs), 1)
    for ax, mode in zip(axes[0], modes):
        for j, p in enumerate(provs):
            ys = []
            for c in cases:
                hit = [r["ms"] for r in ok if r["mode"] == mode and r["provider"] == p and r["case"] == c]
                ys.append(hit[0] if hit else float("nan"))
            ax.bar([i + (j - (len(provs) - 1) / 2) * width for i in range(len(cases))], ys, width, label=p)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(mode)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    r = ok[0]
    fig.suptitle(f"{title} — {r['device']}, {r['dtype']}, torch {r['torch']}, commit {r['commit']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(name: str, rows: Sequence[dict], args, title: str | None = None, table: str | None = None) -> None:
    """Appends to <out>/<name>.csv; writes <out>/<table or name>_<devtag>.md and .png (devtag: cpu, h100,
    ...; ``_quick`` added for --quick runs)."""
    title = title or name
    tag = device_tag(args.device) + ("_quick" if args.quick else "")
    csv_path = os.path.join(args.out, f"{name}.csv")
    append_csv(rows, csv_path)
    md_path = os.path.join(args.out, f"{table or name}_{tag}.md")
    with open(md_path, "w") as f:
        f.write(f"# {title}\n\n{env_header(rows)}\n\n{format_table(rows, markdown=True)}\n")
    try:
        png = plot(rows, os.path.join(args.out, f"{table or name}_{tag}.png"), title)
    except Exception as exc:  # a plot must never cost the numbers
        png = None
        print(f"plot failed: {_first_line(exc)}", file=sys.stderr)
    print(f"saved: {csv_path} (appended), {md_path}" + (f", {png}" if png else ""))


# ------------------------------------------------------------------------- reading results back (CLI)

_NUMERIC = ("ms", "gbps", "tflops", "items_per_s", "peak_mb", "first_ms", "host_ms", "gpu_ms", "speedup", "bytes",
            "flops")


def read_csv(path: str) -> list[dict]:
    """Rows of a results CSV with the numeric columns as floats (empty -> None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in CSV_COLUMNS:
            r.setdefault(k, None)
            if r[k] == "":
                r[k] = None
        for k in _NUMERIC:
            if r[k] is not None:
                r[k] = float(r[k])
        r["quick"] = r["quick"] == "True"
    return rows


def summarize(paths: Sequence[str], all_runs: bool = False) -> str:
    """Markdown: for each CSV (``<name>.csv`` or ``<name>.partial.csv``), the rows of its latest run per
    device (every run with ``all_runs``), each with its environment header."""
    parts = []
    for path in paths:
        rows = read_csv(path)
        if not rows:
            continue
        name = os.path.basename(path)[: -len(".csv")]
        for device in dict.fromkeys(r["device"] for r in rows):
            mine = [r for r in rows if r["device"] == device]
            dates = list(dict.fromkeys(r["date"] for r in mine)) if all_runs else [max(r["date"] for r in mine)]
            for date in dates:
                run = [r for r in mine if r["date"] == date]
                cut = " (PARTIAL: the run was cut short)" if name.endswith(".partial") else ""
                parts.append(f"### {name}{cut}\n\n{env_header(run)}\n\n{format_table(run, markdown=True)}\n")
    return "\n".join(parts) if parts else "(no results)\n"


# provider kept to be timed against another on one GPU -> the provider it may replace (benchmarks/README.md)
VARIANTS = {
    "triton-triton-gemm": "triton",
    "fused-triton-gemm": "fused",
    "fused+inductor-ffn": "fused",  # the FFN on its inductor backend (issue 20 item 3's end-to-end half)
    # the same comparison in runs before cuBLAS became the default GEMM plan (results of 2026-11-25/26)
    "triton-cublas-gemm": "triton",
    "fused-cublas-gemm": "fused",
}


def compare_variants(paths: Sequence[str]) -> str:
    """Markdown: for the latest run per device of each CSV, every variant provider (``VARIANTS``) beside the
    default it may replace, per case and mode: ms and GPU ms of both and variant / default (below 1: the
    variant is faster). The decision the GPU run is for; GPU ms ranks kernels even where ms is host-bound."""
    lines = ["| bench | case | mode | variant | default ms | variant ms | ratio | default GPU ms | variant GPU ms "
             "| GPU ratio |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in paths:
        rows = [r for r in read_csv(path) if r["status"] == "ok"]
        for device in dict.fromkeys(r["device"] for r in rows):
            mine = [r for r in rows if r["device"] == device]
            latest = max(r["date"] for r in mine)
            run = {(r["case"], r["mode"], r["provider"]): r for r in mine if r["date"] == latest}
            for (case, mode, prov), r in run.items():
                base = run.get((case, mode, VARIANTS.get(prov, "")))
                if prov not in VARIANTS or base is None:
                    continue

                def ratio(key):
                    return f"{r[key] / base[key]:.2f}" if r.get(key) and base.get(key) else ""
                lines.append(f"| {r['bench']} | {case} | {mode} | {prov} | {_fmt(base['ms'])} | {_fmt(r['ms'])} | "
                             f"{ratio('ms')} | {_fmt(base.get('gpu_ms'))} | {_fmt(r.get('gpu_ms'))} | "
                             f"{ratio('gpu_ms')} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "(no variant rows)\n"
