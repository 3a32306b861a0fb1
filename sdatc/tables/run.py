"""Reproduce the paper's tables: test sets -> restoration per method -> metrics -> CSV, JSON, Markdown.

    cfg = load_config(TablesConfig, "configs/eval/tables.yaml", ["sets=[REDS4]", "crf=[25]"])
    report = reproduce(cfg)          # writes cfg.out/{per_clip.csv, summary.csv, tables.json, tables.md}

Per set: the test set is built (or reused when its manifest matches) under ``<testsets>/<set>/``;
per set, CRF and method, every clip is restored into ``<results>/<method>/<set>/crf<q>/<clip>/`` and
scored once (a unit, cached under ``<out>/scores/``). A method that cannot run (config or weights
missing) and a metric whose weights are missing are skipped with a message and marked in the
outputs. A failing clip is reported, the rest goes on; the reports cover every finished group and
the run ends with an error naming the failed clips (rerun after fixing: finished units are kept).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from sdatc.config import dump_config
from sdatc.data.testsets import TestSetConfig, build_testsets, load_clip_list
from sdatc.data.video import list_clips
from sdatc.errors import SdatcError
from sdatc.evaluation import build_metrics
from sdatc.metrics import MetricContext, get_metric
from sdatc.tables import report
from sdatc.tables.config import SETS, TablesConfig
from sdatc.tables.methods import MethodSkipped, prepare, restore
from sdatc.tables.units import gt_digest, score_unit, unit_path
from sdatc.utils import atomic_write_text, tqdm
from sdatc.weights import resolve_root

PAPER_CRFS = (15, 25, 35)


@dataclasses.dataclass
class SetInfo:
    name: str
    key: str  # folder name (with _first<N> for max_frames runs)
    root: Path  # <testsets>/<key>
    manifest: dict
    clips: list[str]


def gt_roots(cfg: TablesConfig) -> dict[str, Path]:
    """The GT root of every chosen set; an error naming the first set that has none."""
    roots = {}
    for s in cfg.sets:
        path = getattr(cfg.gt_roots, s) or (str(Path(cfg.data_root) / s / "GT") if cfg.data_root else None)
        if path is None:
            raise SdatcError(f"set {s}: no GT root (set gt_roots.{s}=PATH in the config, "
                             f"or data_root=DIR holding {s}/GT)")
        if not Path(path).exists():
            raise SdatcError(f"set {s}: GT root not found: {path}")
        roots[s] = Path(path)
    return roots


def build_set(cfg: TablesConfig, name: str, gt_root: Path, log=print) -> SetInfo:
    """Build (or reuse) a set's compressed test set; the CRFs built are the paper's plus any asked for,
    so that runs choosing different CRFs share one manifest."""
    key = cfg.set_key(name)
    if cfg.official_clips:  # own clips under a paper set's name: say which switch takes them
        have = list_clips(gt_root)
        missing = [c for c in load_clip_list(SETS[name]) if c not in have]
        if missing:
            raise SdatcError(f"{gt_root} lacks the paper's {name} clips ({', '.join(missing[:4])}"
                             f"{', ...' if len(missing) > 4 else ''}; it has {', '.join(list(have)[:4]) or 'none'}"
                             f"{', ...' if len(have) > 4 else ''}): for your own clips set official_clips=false")
    crfs = sorted(set(PAPER_CRFS) | set(cfg.crf))
    ts = TestSetConfig(gt_root=str(gt_root), out=str(Path(cfg.testsets) / key), crf=crfs, pix_fmt=cfg.pix_fmt,
                       clip_list=SETS[name] if cfg.official_clips else None, max_frames=cfg.max_frames)
    manifest, stats = build_testsets(ts)
    clips = list(load_clip_list(SETS[name])) if cfg.official_clips else list(list_clips(gt_root))
    log(f"{name}: test set in {ts.out} ({stats['built']} clips built, {stats['reused']} reused)")
    return SetInfo(name, key, Path(ts.out), manifest, clips)


def reproduce(cfg: TablesConfig, log=print) -> dict:
    """Run everything ``cfg`` asks for; returns the sidecar dict (also written as tables.json)."""
    names = [get_metric(m).name for m in cfg.metrics]  # unknown metric names fail here
    roots = gt_roots(cfg)
    weights = resolve_root(cfg.weights)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    methods, skipped = {}, {}
    for m in cfg.methods:
        try:
            methods[m] = prepare(m, cfg.method_configs[m], weights, cfg.infer_overrides)
        except MethodSkipped as e:
            skipped[m] = str(e)
            log(str(e))
    ctx = MetricContext(device=cfg.device, weights=weights, batch_size=cfg.batch_size)
    metrics, missing = build_metrics(names, ctx, log)

    sets: dict[str, SetInfo] = {}
    failures: list[str] = []

    def fail(msg: str) -> None:
        failures.append(msg)
        log(f"failed: {msg}")

    units: dict[tuple[str, str, int, str], dict] = {}
    for s in cfg.sets:
        try:
            sets[s] = info = build_set(cfg, s, roots[s], log)
        except SdatcError as e:
            fail(f"set {s}: {e}")
            continue
        for q in cfg.crf:
            for m in list(methods):
                sr_root = Path(cfg.results) / m / info.key / f"crf{q}"
                where = f"{s} crf{q} {m}"
                try:
                    errors = restore(methods[m], info.root / f"BIx4_crf{q}", sr_root, info.clips, log)
                except MethodSkipped as e:
                    skipped[m] = str(e)
                    log(str(e))
                    del methods[m]
                    continue
                for clip, err in errors.items():
                    fail(f"clip {clip!r} ({where}): restoration failed: {err}")
                for clip in tqdm(info.clips, desc=f"score {where}", unit="clip", leave=False):
                    if clip in errors:
                        continue
                    entry = info.manifest["clips"][clip]
                    path = unit_path(out, m, info.key, q, clip)
                    try:
                        units[(s, m, q, clip)] = score_unit(path, clip, sr_root / clip, Path(entry["gt_dir"]),
                                                            entry["frames"], gt_digest(entry), metrics)
                    except (SdatcError, ValueError, RuntimeError) as e:  # this clip fails, the others go on
                        fail(f"{where}: {e}" if f"{clip!r}" in str(e) else f"clip {clip!r} ({where}): {e}")

    tables = report.collect(cfg, sets, methods, units, metrics, missing, out)
    report.write_csv(out / "per_clip.csv", tables["per_clip"], report.per_clip_columns(names))
    report.write_csv(out / "summary.csv", tables["summary"], report.SUMMARY_COLUMNS)
    extra = {}
    if cfg.runtime:
        extra["runtime"] = _runtime(cfg, methods, skipped, weights, out, log)
    if cfg.figures.enabled and units:
        try:
            from sdatc.tables.figures import make_figures

            extra["figures"] = make_figures(cfg, sets, methods, out)
        except SdatcError as e:
            fail(f"figures: {e}")
    sidecar = report.sidecar(cfg, sets, methods, skipped, metrics, missing, weights, started, failures, extra)
    atomic_write_text(out / "tables.json", json.dumps(sidecar, indent=1, default=str) + "\n")
    atomic_write_text(out / "tables.md", report.markdown(cfg, tables["summary"], sidecar))
    log(f"wrote {out}/summary.csv, per_clip.csv, tables.json, tables.md")
    if failures:
        more = f" (and {len(failures) - 1} more, listed in {out}/tables.json)" if len(failures) > 1 else ""
        raise SdatcError(f"{failures[0]}{more}; finished units are kept, rerun to resume")
    return sidecar


def _runtime(cfg: TablesConfig, methods: dict, skipped: dict, weights: Path, out: Path, log) -> dict:
    """Table III: seconds per output frame of ``runtime_method`` on ``runtime_size`` input (bench_infer.py's logic)."""
    name = cfg.runtime_method
    if name not in cfg.method_configs or cfg.method_configs[name].builtin:
        return {"status": "skipped", "reason": f"runtime_method {name!r} is not an inference method of method_configs"}
    if name in skipped:
        return {"status": "skipped", "reason": skipped[name]}
    from sdatc.benchmark import bench

    try:
        method = prepare(name, cfg.method_configs[name], weights, [*cfg.infer_overrides, *cfg.runtime_overrides])
        h, w = cfg.runtime_size
        result = bench(method.infer, h, w, cfg.runtime_frames)
    except SdatcError as e:
        log(f"runtime: skipped, {e}")
        return {"status": "skipped", "reason": str(e)}
    result.update(status="done", method=name, overrides=cfg.runtime_overrides)
    atomic_write_text(out / "runtime.json", json.dumps(result, indent=1) + "\n")
    log(f"runtime: {result['seconds_per_frame']:.3f} s per {result['output'][1]}x{result['output'][0]} frame "
        f"({result['device']}, {result['dtype']})")
    return result
