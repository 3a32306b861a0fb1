"""The reproduction's outputs: per-clip and summary CSV, the JSON sidecar, the Markdown tables.

summary.csv has the columns of sdatc/reference/paper_tables.csv (``table,dataset,crf,method,psnr_y,...,
clipiqa``) then ``vmaf,warping_error,tlp,tof,clips,frames``. A metric whose weights are missing is
``missing``; one not asked for is empty. A (set, CRF, method) group appears only when every clip of
it is scored.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

import sdatc
from sdatc.config import REPO_ROOT, to_dict
from sdatc.evaluation import MISSING
from sdatc.metrics import get_metric
from sdatc.tables.config import EXTRA_METRICS, TABLE_METRICS, TABLE_OF_SET, TablesConfig
from sdatc.tables.paper import load_paper
from sdatc.tables.units import set_value, unit_dir
from sdatc.utils import atomic_write_text, sha256_file

SUMMARY_COLUMNS = ["table", "dataset", "crf", "method", *TABLE_METRICS, *EXTRA_METRICS, "clips", "frames"]
HEADERS = {"psnr_y": "PSNR", "ssim_y": "SSIM", "lpips": "LPIPS", "dists": "DISTS", "fid": "FID", "niqe": "NIQE",
           "maniqa": "MANIQA", "clipiqa": "CLIP-IQA", "vmaf": "VMAF", "warping_error": "E_warp (x1e3)",
           "tlp": "tLP (x100)", "tof": "tOF"}
DECIMALS = {"psnr_y": 2, "ssim_y": 4, "lpips": 4, "dists": 4, "fid": 2, "niqe": 3, "maniqa": 4, "clipiqa": 4,
            "vmaf": 2, "warping_error": 3, "tlp": 3, "tof": 3}


def per_clip_columns(metrics: list[str]) -> list[str]:
    return ["dataset", "crf", "method", "clip", "frames", *metrics]


def collect(cfg: TablesConfig, sets: dict, methods: dict, units: dict, metrics: dict, missing: dict, out: Path) -> dict:
    """Per-clip rows and summary rows (mean over clips; set metrics over all frames of the set)."""
    names = [get_metric(m).name for m in cfg.metrics]
    per_clip, summary = [], []
    for s, info in sets.items():
        for q in cfg.crf:
            for m in methods:
                got = [(c, units[(s, m, q, c)]) for c in info.clips if (s, m, q, c) in units]
                for clip, u in got:
                    row = {"dataset": s, "crf": q, "method": cfg.label(m), "clip": clip, "frames": u.get("frames")}
                    for n in names:
                        row[n] = MISSING if n in missing else ("" if metrics[n].kind == "set" else u["scores"][n])
                    per_clip.append(row)
                if len(got) != len(info.clips) or not got:
                    continue
                row = {"table": TABLE_OF_SET[s], "dataset": s, "crf": q, "method": cfg.label(m),
                       "clips": len(got), "frames": sum(u["frames"] for _, u in got)}
                for n in names:
                    if n in missing:
                        row[n] = MISSING
                    elif metrics[n].kind == "set":
                        row[n] = set_value(unit_dir(out, m, info.key, q), n, metrics[n], got)
                    else:
                        row[n] = float(np.mean([u["scores"][n] for _, u in got]))
                summary.append(row)
    return {"per_clip": per_clip, "summary": summary}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6f}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: _cell(r.get(c)) for c in columns})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- JSON sidecar


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions(metrics: dict, sets: dict) -> dict:
    import torch

    v = {"sdatc": sdatc.__version__, "git": _git_revision(), "python": platform.python_version(),
         **{name: _version(name) for name in ("torch", "torchvision", "pyiqa", "numpy", "opencv-python-headless",
                                              "av", "imageio-ffmpeg", "scipy", "timm", "openai-clip")},
         "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        from sdatc.metrics.vmaf import ffmpeg_version

        v["ffmpeg"] = ffmpeg_version()
    except Exception:  # no imageio-ffmpeg binary: recorded as unknown
        v["ffmpeg"] = None
    if "vmaf" in metrics:
        v["libvmaf"] = getattr(metrics["vmaf"], "libvmaf_version", None)
    v["x264"] = sorted({i.manifest.get("versions", {}).get("x264") for i in sets.values()} - {None})
    return v


def sidecar(cfg: TablesConfig, sets: dict, methods: dict, skipped: dict, metrics: dict, missing: dict,
            weights: Path, started: str, failures: list[str], extra: dict) -> dict:
    names = [get_metric(m).name for m in cfg.metrics]
    return {
        "created": started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "versions": versions(metrics, sets),
        "metrics": {n: {"variant": get_metric(n).variant, "kind": get_metric(n).kind,
                        "higher_is_better": get_metric(n).higher_is_better,
                        "status": MISSING if n in missing else "ok", **({"reason": missing[n]} if n in missing else {})}
                    for n in names},
        "weights_root": str(weights),
        "methods": {**{m: {"status": "ran", **methods[m].describe()} for m in methods},
                    **{m: {"status": "skipped", "reason": r} for m, r in skipped.items()}},
        "sets": {s: {"folder": str(i.root), "clips": i.clips, "official_clips": cfg.official_clips,
                     "max_frames": cfg.max_frames, "settings": i.manifest.get("settings"),
                     "manifest_sha256": sha256_file(i.root / "manifest.json")} for s, i in sets.items()},
        "failures": failures,
        **extra,
    }


# --------------------------------------------------------------------------- Markdown


def fmt(metric: str, v, signed: bool = False) -> str:
    if isinstance(v, str):
        return v or "-"
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:+.{DECIMALS[metric]}f}" if signed else f"{v:.{DECIMALS[metric]}f}"


def _arrow(metric: str) -> str:
    return "↑" if get_metric(metric).higher_is_better else "↓"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def quality_section(cfg: TablesConfig, dataset: str, summary: list[dict], paper) -> list[str]:
    cols = list(TABLE_METRICS)
    header = ["Method", "CRF", *(f"{HEADERS[c]}{_arrow(c)}" for c in cols)]
    rows = []
    for q in cfg.crf:
        for method in paper.methods(dataset):
            p = paper.quality.get((dataset, q, method))
            if p:
                name = f"**{method} (paper)**" if method == "SDATC" else f"{method} (paper)"
                rows.append([name, str(q), *(fmt(c, p.get(c)) for c in cols)])
        for r in (r for r in summary if r["dataset"] == dataset and r["crf"] == q):
            rows.append([f"{r['method']} (ours)", str(q), *(fmt(c, r.get(c)) for c in cols)])
            key = next((k for k, mc in cfg.method_configs.items() if cfg.label(k) == r["method"]), None)
            ref = cfg.method_configs[key].paper if key else None
            p = paper.quality.get((dataset, q, ref)) if ref else None
            if p:
                rows.append([f"Δ {r['method']} − {ref} (paper)", str(q),
                             *(fmt(c, r[c] - p[c], signed=True) if isinstance(r.get(c), float) else "-" for c in cols)])
    return [f"## Table {TABLE_OF_SET[dataset]}: {dataset}", "", *_table(rows, header), ""]


def markdown(cfg: TablesConfig, summary: list[dict], meta: dict) -> str:
    paper = load_paper()
    lines = ["# SDATC tables: paper vs this run", "",
             f"Created {meta['created']} with sdatc {meta['versions']['sdatc']} "
             f"(git {meta['versions']['git'] or 'unknown'}), "
             f"torch {meta['versions']['torch']}, pyiqa {meta['versions']['pyiqa']}, {meta['versions']['ffmpeg']}, "
             f"{', '.join(meta['versions']['x264']) or 'x264 unknown'}. Protocol: docs/evaluation.md of sdatc; "
             "every setting is in tables.json.", ""]
    if not cfg.official_clips or cfg.max_frames is not None:
        what = [*(["not the paper's clip lists"] if not cfg.official_clips else []),
                *([f"only the first {cfg.max_frames} frames of each clip"] if cfg.max_frames is not None else [])]
        lines += [f"> **Not comparable to the paper**: {' and '.join(what)}.", ""]
    notes = [f"- `{n}`: missing ({m['reason']})" for n, m in meta["metrics"].items() if m["status"] == MISSING]
    notes += [f"- {m['reason']}" for m in meta["methods"].values() if m["status"] == "skipped"]
    if notes:
        lines += ["Not computed here:", "", *notes, ""]
    for dataset in cfg.sets:
        if any(r["dataset"] == dataset for r in summary):
            lines += quality_section(cfg, dataset, summary, paper)
        else:
            lines += [f"## Table {TABLE_OF_SET[dataset]}: {dataset}", "", "No complete results for this set.", ""]
    lines += _vmaf_section(cfg, summary, paper, meta)
    lines += _temporal_section(cfg, summary)
    if "runtime" in meta:
        lines += _runtime_section(meta["runtime"], paper)
    if meta.get("figures"):
        lines += ["## Figures", "",
                  *(f"- [{Path(p).name}](figures/{Path(p).name})" for p in meta["figures"].values()), ""]
    return "\n".join(lines)


def _vmaf_section(cfg, summary, paper, meta) -> list[str]:
    if "vmaf" not in meta["metrics"]:
        return []
    cols = ["vmaf", "niqe", "maniqa", "clipiqa"]
    rows = [[f"{m} (paper)", *(fmt(c, v.get(c)) for c in cols)] for m, v in paper.vmaf.items()]
    rows += [[f"{r['method']} (ours)", *(fmt(c, r.get(c)) for c in cols)]
             for r in summary if r["dataset"] == "REDS4" and r["crf"] == 25]
    return ["## Table VII: VMAF on REDS4, CRF 25", "",
            *_table(rows, ["Method", *(f"{HEADERS[c]}{_arrow(c)}" for c in cols)]), ""]


def _temporal_section(cfg, summary) -> list[str]:
    cols = [c for c in ("warping_error", "tlp", "tof")
            if any(isinstance(r.get(c), (float, str)) and r.get(c) != "" for r in summary)]
    if not cols:
        return []
    rows = [[r["dataset"], str(r["crf"]), r["method"], *(fmt(c, r.get(c)) for c in cols)] for r in summary]
    return ["## Temporal consistency (not in the paper)", "",
            *_table(rows, ["Set", "CRF", "Method", *(f"{HEADERS[c]}{_arrow(c)}" for c in cols)]), ""]


def _runtime_section(rt: dict, paper) -> list[str]:
    rows = [[f"{m} (paper, A100)", v.get("trainable_params", "-"), v.get("total_params", "-"), f"{v['runtime_s']}"]
            for m, v in paper.runtime.items()]
    if rt.get("status") == "done":
        out = f"{rt['output'][1]}x{rt['output'][0]}"
        rows.append([f"{rt['method']} (ours, {rt['device']}, {rt['dtype']})", "-", "-",
                     f"{rt['seconds_per_frame']:.3f}"])
        note = (f"Ours: seconds per {out} output frame, {rt['frames']} frames of "
                f"{rt['input'][1]}x{rt['input'][0]} input, {rt['steps']} steps, tiling {rt['tiling'].get('mode')}, "
                f"flow guidance {'on' if rt['flow_guidance'] else 'off'}, model loading and the warm-up window "
                "excluded. Timings on other GPUs are not comparable to the paper's.")
    else:
        note = f"Ours: not measured ({rt.get('reason')})."
    return ["## Table III: runtime (seconds per frame)", "",
            *_table(rows, ["Method", "Trainable", "Total", "Runtime (s)"]), "", note, ""]
