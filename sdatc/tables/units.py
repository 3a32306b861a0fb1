"""One scoring unit = (method, set, CRF, clip): its scores cached in a JSON file, so reruns resume.

    <out>/scores/<method>/<set>/crf<q>/<clip>.json       {"fingerprint", "frames", "scores": {metric: value}}
    <out>/scores/<method>/<set>/crf<q>/<clip>.<m>.npz    per-clip data of a set metric (FID features)

A unit is reused when the SR frames (names, sizes, modification times) and the GT frames (their
sha256 in the test-set manifest) are unchanged; only metrics it lacks are computed (e.g. when a
metric's weights have arrived since).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdatc.data.video import list_frame_files
from sdatc.evaluation import score_clip
from sdatc.metrics.base import Metric
from sdatc.metrics.learned import load_features, save_features
from sdatc.utils import atomic_write_text


def fingerprint(sr_dir: Path, gt_digest: str) -> str:
    h = hashlib.sha256(gt_digest.encode())
    for p in list_frame_files(sr_dir):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def gt_digest(entry: dict) -> str:
    """A digest of a manifest clip entry's GT frame hashes."""
    return hashlib.sha256(json.dumps(entry["gt_sha256"], sort_keys=True).encode()).hexdigest()


def unit_dir(out: Path, method: str, set_key: str, crf: int) -> Path:
    return out / "scores" / method / set_key / f"crf{crf}"


def unit_path(out: Path, method: str, set_key: str, crf: int, clip: str) -> Path:
    return unit_dir(out, method, set_key, crf) / f"{clip}.json"


def score_unit(path: Path, clip: str, sr_dir: Path, gt_dir: Path, frames: int, digest: str,
               metrics: dict[str, Metric]) -> dict:
    """Scores of one unit: the cached ones plus any metric of ``metrics`` it lacks (computed in one pass).

    Raises SdatcError naming the clip when the SR frames do not match the GT (count or size).
    """
    fp = fingerprint(sr_dir, digest) if sr_dir.is_dir() else ""
    unit = None
    if path.is_file():
        unit = json.loads(path.read_text())
        if unit.get("fingerprint") != fp:
            unit = None
    unit = unit or {"clip": clip, "sr_dir": str(sr_dir), "gt_dir": str(gt_dir), "fingerprint": fp, "scores": {}}
    todo = {m: metric for m, metric in metrics.items() if m not in unit["scores"]}
    if todo:
        result = score_clip(clip, sr_dir, gt_dir, todo, num_frames=frames)
        unit["frames"] = result["frames"]
        for m, metric in todo.items():
            if metric.kind == "set":
                data = path.with_name(f"{clip}.{m}.npz")
                save_features(data, result[m])
                unit["scores"][m] = {"data": data.name}
            else:
                unit["scores"][m] = result[m]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(unit, indent=1))
    return unit


def set_value(folder: Path, name: str, metric: Metric, units: list[tuple[str, dict]]) -> float:
    """A set metric over the given units (e.g. FID of a set at one CRF), cached in
    ``folder/_set_<name>.json`` while the units' frames are unchanged (FID's matrix square root of
    2048x2048 takes about half a minute on a CPU)."""
    key = hashlib.sha256(json.dumps([[c, u["fingerprint"]] for c, u in units]).encode()).hexdigest()
    cache = folder / f"_set_{name}.json"
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old["value"]
    value = metric.combine([load_features(folder / u["scores"][name]["data"]) for _, u in units])
    atomic_write_text(cache, json.dumps({"key": key, "value": value}))
    return value
