"""The offline weights folder: which files each component needs, where they go, whether they are there.

Nothing is ever downloaded. Get the files once (on a machine with a network) and lay them out as

    <root>/hub/pyiqa/         LPIPS_v0.1_alex-df73285e.pth  DISTS_weights-f5e65c96.pth
                              pt_inception-2015-12-05-6726825d.pth  niqe_modelparameters.mat  ckpt_koniq10k.pt
    <root>/hub/checkpoints/   alexnet-owt-7be5be79.pth  vgg16-397923af.pth  raft_large_C_T_SKHT_V2-ff5fadd5.pth
    <root>/hub/clip/          RN50.pt
    <root>/stable-diffusion-2-1-base/   SD 2.1-base in diffusers layout (or $SDATC_SD21_PATH)
    <root>/sdatc/             trained SDATC modules (sdatc_modules.safetensors + config.yaml, from train.py)

``<root>`` is the ``weights`` config key, else ``$SDATC_WEIGHTS``, else ``$TORCH_HOME``, else torch's
default ``~/.cache/torch`` (so a pyiqa cache filled on another machine can be copied as is). MANIQA
needs no timm ViT file: ``ckpt_koniq10k.pt`` holds the whole network and is loaded strictly.

    rows = check_weights(resolve_root(None))   # one row per file: component, path, present, sha256
    require("lpips", root)                     # raises WeightsMissing naming each absent file
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sdatc.errors import SdatcError
from sdatc.utils import sha256_file

ENV_WEIGHTS = "SDATC_WEIGHTS"
ENV_SD21 = "SDATC_SD21_PATH"  # same variable as sdatc.models.backbone.ENV_SD21
SD21_DIR = "stable-diffusion-2-1-base"
SDATC_DIR = "sdatc"
PYIQA_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
TORCHVISION_URL = "https://download.pytorch.org/models/"


class WeightsMissing(SdatcError):
    """Files a component needs are not in the weights folder; the message names each and its place."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One file of the weights folder.

    ``sha256_prefix`` is the torch-hub style hash in the name (``name-<first 8 hex of sha256>.ext``);
    ``verified`` says whether the loader itself rejects a file whose hash differs (torchvision and
    CLIP do; pyiqa does not, so a mismatch there is only reported).
    """

    name: str
    subdir: str
    used_by: tuple[str, ...]
    url: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    verified: bool = False

    def path(self, root: Path) -> Path:
        return root / self.subdir / self.name


def _pyiqa(name: str, used_by: tuple[str, ...], prefix: str | None = None) -> WeightFile:
    return WeightFile(name, "hub/pyiqa", used_by, PYIQA_URL + name, sha256_prefix=prefix)


def _torchvision(name: str, used_by: tuple[str, ...], prefix: str) -> WeightFile:
    return WeightFile(name, "hub/checkpoints", used_by, TORCHVISION_URL + name, sha256_prefix=prefix, verified=True)


RAFT_FILE = _torchvision("raft_large_C_T_SKHT_V2-ff5fadd5.pth", ("warping_error", "flow guidance"), "ff5fadd5")
CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"

# Files per metric (the metric names of sdatc.metrics); RAFT is also used by inference's flow guidance.
METRIC_FILES: dict[str, tuple[WeightFile, ...]] = {
    "lpips": (_pyiqa("LPIPS_v0.1_alex-df73285e.pth", ("lpips", "tlp"), "df73285e"),
              _torchvision("alexnet-owt-7be5be79.pth", ("lpips", "tlp"), "7be5be79")),
    "dists": (_pyiqa("DISTS_weights-f5e65c96.pth", ("dists",), "f5e65c96"),
              _torchvision("vgg16-397923af.pth", ("dists",), "397923af")),
    "fid": (_pyiqa("pt_inception-2015-12-05-6726825d.pth", ("fid",), "6726825d"),),
    "niqe": (_pyiqa("niqe_modelparameters.mat", ("niqe",)),),
    "maniqa": (_pyiqa("ckpt_koniq10k.pt", ("maniqa",)),),
    "clipiqa": (WeightFile("RN50.pt", "hub/clip", ("clipiqa",),
                           f"https://openaipublic.azureedge.net/clip/models/{CLIP_RN50_SHA256}/RN50.pt",
                           sha256=CLIP_RN50_SHA256, verified=True),),
    "warping_error": (RAFT_FILE,),
}
METRIC_FILES["tlp"] = METRIC_FILES["lpips"]

# SD 2.1-base (diffusers layout) and the trained SDATC modules: paths relative to their folders.
SD21_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.txt")
SDATC_FILES = ("sdatc_modules.safetensors", "config.yaml")  # sdatc.models.sdatc WEIGHTS_NAME, CONFIG_NAME


def resolve_root(root: str | Path | None = None) -> Path:
    """The weights folder: ``root``, else $SDATC_WEIGHTS, else $TORCH_HOME, else ~/.cache/torch."""
    value = root or os.environ.get(ENV_WEIGHTS) or os.environ.get("TORCH_HOME")
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "torch"


def sd21_dir(root: Path) -> Path:
    """Where SD 2.1-base is looked for: $SDATC_SD21_PATH, else ``<root>/stable-diffusion-2-1-base``."""
    env = os.environ.get(ENV_SD21)
    return Path(env).expanduser() if env else root / SD21_DIR


def missing_files(metric: str, root: Path) -> list[WeightFile]:
    """The files of ``metric`` that are not in ``root`` (empty: ready, or a metric needing none)."""
    return [f for f in METRIC_FILES.get(metric, ()) if not f.path(root).is_file()]


def missing_message(metric: str, files: list[WeightFile], root: Path) -> str:
    paths = ", ".join(str(f.path(root)) for f in files)
    return f"{metric}: weights missing: {paths} (scripts/check_weights.py says where to get each)"


def require(metric: str, root: Path) -> list[Path]:
    """Paths of ``metric``'s files; WeightsMissing naming every absent file and where it goes."""
    files = missing_files(metric, root)
    if files:
        raise WeightsMissing(missing_message(metric, files, root))
    return [f.path(root) for f in METRIC_FILES.get(metric, ())]


def check_weights(root: Path, hash_all: bool = False) -> list[dict]:
    """One row per needed file: component, file, location, status, sha256.

    status: ``present`` / ``missing`` / ``sha256 mismatch`` (a verified hash that differs) /
    ``name hash differs`` (pyiqa files whose name's hash prefix differs; pyiqa does not check it).
    sha256 is computed for present files with a known hash, or for all with ``hash_all``.
    """
    rows: list[dict] = []
    seen: set[Path] = set()
    for files in METRIC_FILES.values():
        for f in files:
            path = f.path(root)
            if path in seen:
                continue
            seen.add(path)
            rows.append(_row(", ".join(f.used_by), f.name, path, f, hash_all))
    sd = sd21_dir(root)
    for rel in SD21_FILES:
        rows.append(_row("SD 2.1-base", rel, sd / rel, None, hash_all))
    for name in SDATC_FILES:
        rows.append(_row("SDATC trained modules", name, root / SDATC_DIR / name, None, hash_all))
    return rows


def _row(component: str, name: str, path: Path, f: WeightFile | None, hash_all: bool) -> dict:
    row = {"component": component, "file": name, "location": str(path), "status": "missing", "sha256": ""}
    if f is not None and f.sha256:
        row["expected_sha256"] = f.sha256
    elif f is not None and f.sha256_prefix:
        row["expected_sha256"] = f.sha256_prefix + "..."
    if not path.is_file():
        return row
    row["status"] = "present"
    known = f is not None and (f.sha256 or f.sha256_prefix)
    if known or hash_all:
        digest = sha256_file(path)
        row["sha256"] = digest
        expected = (f.sha256 or f.sha256_prefix) if f is not None else None
        if expected and not digest.startswith(expected):
            row["status"] = "sha256 mismatch" if f.verified else "name hash differs"
    return row


def packaged_copy(name: str) -> Path | None:
    """An identical copy shipped in an installed package: the lpips wheel holds LPIPS' v0.1 AlexNet layers."""
    if name != "LPIPS_v0.1_alex-df73285e.pth":
        return None
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    path = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth" if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


def sources(rows: list[dict]) -> list[str]:
    """``file: url`` for every missing file that has a known source."""
    urls = {f.name: f.url for files in METRIC_FILES.values() for f in files}
    out = []
    for r in rows:
        if r["status"] == "missing" and r["file"] in urls:
            copy = packaged_copy(r["file"])
            out.append(f"{r['file']}: {urls[r['file']]}" + (f" (or copy {copy}: the same file)" if copy else ""))
    return out


def format_rows(rows: list[dict]) -> str:
    cols = ["component", "file", "status", "location", "sha256"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols[:3]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in cols).rstrip()]
    for r in rows:
        digest = r["sha256"] or (f"(expected {r['expected_sha256']})" if r.get("expected_sha256") else "")
        cells = [str(r["component"]).ljust(widths["component"]), r["file"].ljust(widths["file"]),
                 r["status"].ljust(widths["status"]), r["location"], digest]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
