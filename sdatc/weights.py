"""The offline weights folder: which files each component needs, where they go, whether they are there.

Nothing is downloaded at run time. ``scripts/check_weights.py --fetch`` (:func:`fetch_missing`) gets
the missing metric and RAFT files from their official URLs, checking each hash; or get them by hand
(on a machine with a network) and lay them out as

    <root>/hub/pyiqa/         LPIPS_v0.1_alex-df73285e.pth  DISTS_weights-f5e65c96.pth
                              pt_inception-2015-12-05-6726825d.pth  niqe_modelparameters.mat  ckpt_koniq10k.pt
    <root>/hub/checkpoints/   alexnet-owt-7be5be79.pth  vgg16-397923af.pth  raft_large_C_T_SKHT_V2-ff5fadd5.pth
    <root>/hub/clip/          RN50.pt
    <root>/stable-diffusion-2-1-base/   SD 2.1-base in diffusers layout (or $SDATC_SD21_PATH)
    <root>/sdatc/             trained SDATC modules (sdatc_modules.safetensors + config.yaml, from train.py;
                              none are published)

``<root>`` is the ``weights`` config key, else ``$SDATC_WEIGHTS``, else ``$TORCH_HOME``, else torch's
default ``~/.cache/torch`` (so a pyiqa cache filled on another machine can be copied as is). MANIQA
needs no timm ViT file: ``ckpt_koniq10k.pt`` holds the whole network and is loaded strictly.

    rows = check_weights(resolve_root(None))   # one row per file: component, path, present, sha256
    require("lpips", root)                     # raises WeightsMissing naming each absent file
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sdatc.errors import SdatcError
from sdatc.utils import atomic_path, sha256_file

ENV_WEIGHTS = "SDATC_WEIGHTS"
ENV_SD21 = "SDATC_SD21_PATH"  # same variable as sdatc.models.backbone.ENV_SD21
ENV_MIRROR = "SDATC_WEIGHTS_MIRROR"  # base URL replacing the host of every download (check_weights.py --fetch)
SD21_DIR = "stable-diffusion-2-1-base"
SDATC_DIR = "sdatc"
PYIQA_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
TORCHVISION_URL = "https://download.pytorch.org/models/"


class WeightsMissing(SdatcError):
    """Files a component needs are not in the weights folder; the message names each and its place."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One file of the weights folder.

    ``sha256`` is the full hash where one is known; ``sha256_prefix`` the torch-hub style hash in the
    name (``name-<first 8 hex of sha256>.ext``); ``hash_note`` says where the hash comes from.
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
    hash_note: str = ""

    def path(self, root: Path) -> Path:
        return root / self.subdir / self.name


_PREFIX_NOTE = "prefix only: torch hub's name convention (first 8 hex of the sha256); no full hash published"
_NO_HASH_NOTE = "none known: only the download's length is checked (its sha256 is printed, to pin it)"


def _pyiqa(name: str, used_by: tuple[str, ...], prefix: str | None = None, sha256: str | None = None,
           note: str = _NO_HASH_NOTE) -> WeightFile:
    return WeightFile(name, "hub/pyiqa", used_by, PYIQA_URL + name, sha256=sha256, sha256_prefix=prefix, hash_note=note)


def _torchvision(name: str, used_by: tuple[str, ...], prefix: str) -> WeightFile:
    return WeightFile(name, "hub/checkpoints", used_by, TORCHVISION_URL + name, sha256_prefix=prefix, verified=True,
                      hash_note=_PREFIX_NOTE)


RAFT_FILE = _torchvision("raft_large_C_T_SKHT_V2-ff5fadd5.pth", ("warping_error", "flow guidance"), "ff5fadd5")
CLIP_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"

# Files per metric (the metric names of sdatc.metrics); RAFT is also used by inference's flow guidance.
# The one table of URLs and hashes: check_weights.py checks present files against it, --fetch downloads.
METRIC_FILES: dict[str, tuple[WeightFile, ...]] = {
    "lpips": (_pyiqa("LPIPS_v0.1_alex-df73285e.pth", ("lpips", "tlp"), "df73285e",
                     "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                     "full: computed from the identical weights/v0.1/alex.pth in the lpips wheel"),
              _torchvision("alexnet-owt-7be5be79.pth", ("lpips", "tlp"), "7be5be79")),
    "dists": (_pyiqa("DISTS_weights-f5e65c96.pth", ("dists",), "f5e65c96",
                     "f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
                     "full: the published sha256 of DISTS' official weights.pt "
                     "(this file renamed; name prefix agrees)"),
              _torchvision("vgg16-397923af.pth", ("dists",), "397923af")),
    "fid": (_pyiqa("pt_inception-2015-12-05-6726825d.pth", ("fid",), "6726825d",
                   "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                   "full: the published sha256 of pytorch-fid's release file of the same name (95,628,359 bytes)"),),
    "niqe": (_pyiqa("niqe_modelparameters.mat", ("niqe",)),),
    "maniqa": (_pyiqa("ckpt_koniq10k.pt", ("maniqa",)),),
    "clipiqa": (WeightFile("RN50.pt", "hub/clip", ("clipiqa",),
                           f"https://openaipublic.azureedge.net/clip/models/{CLIP_RN50_SHA256}/RN50.pt",
                           sha256=CLIP_RN50_SHA256, verified=True,
                           hash_note="full: in CLIP's own URL, checked by clip.load"),),
    "warping_error": (RAFT_FILE,),
}
METRIC_FILES["tlp"] = METRIC_FILES["lpips"]

# SD 2.1-base (diffusers layout) and the trained SDATC modules: paths relative to their folders.
SD21_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.txt")
SDATC_FILES = ("sdatc_modules.safetensors", "config.yaml")  # sdatc.models.sdatc WEIGHTS_NAME, CONFIG_NAME
SDATC_COMPONENT = "SDATC trained modules"
NO_TRAINED_WEIGHTS = ("trained SDATC / UltraVSR modules: none are published; train them (docs/training.md: "
                      "scripts/train.py writes them) or use the preview model (assets/preview, infer.py's default)")


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
        rows.append(_row(SDATC_COMPONENT, name, root / SDATC_DIR / name, None, hash_all))
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


# ---- check_weights.py --fetch: the only place that downloads ----------------------------------------

class FetchFailed(SdatcError):
    """One file could not be fetched (HTTP error, short read, wrong hash); nothing was left behind."""


def weight_files() -> list[WeightFile]:
    """Every metric / RAFT file once (LPIPS' files serve lpips and tlp)."""
    out: dict[str, WeightFile] = {}
    for files in METRIC_FILES.values():
        for f in files:
            out.setdefault(f"{f.subdir}/{f.name}", f)
    return list(out.values())


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` with its scheme and host replaced by ``mirror`` (``https://host[/prefix]``); the path is kept."""
    if not mirror:
        return url
    m = urllib.parse.urlsplit(mirror)
    if m.scheme not in ("http", "https") or not m.netloc:
        raise SdatcError(f"weights mirror must be a URL like https://host[/prefix], got {mirror!r}")
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def fetch_missing(root: Path, mirror: str | None = None, progress: bool = True) -> dict:
    """Download every missing metric / RAFT file of :data:`METRIC_FILES` into ``root``, checking its hash.

    Present files are left as they are (never re-downloaded). Each download goes to a hidden temporary
    name beside its place and is renamed only once its sha256 (full, else the name's prefix) matches;
    any failure deletes it, is printed in one line (stderr) and the next file is tried. ``mirror``
    (else $SDATC_WEIGHTS_MIRROR) replaces scheme and host of every URL. Returns lists of file names
    ``{"fetched", "present", "failed"}`` and the failures' one-line ``"errors"``.
    """
    mirror = mirror or os.environ.get(ENV_MIRROR) or None
    report: dict[str, list[str]] = {"fetched": [], "present": [], "failed": [], "errors": []}
    for f in weight_files():
        path = f.path(root)
        if path.is_file():
            report["present"].append(f.name)
            continue
        url = mirrored(f.url, mirror)
        try:
            digest = _download(f, url, path, progress)
        except FetchFailed as e:
            print(f"error: {e}", file=sys.stderr)
            report["failed"].append(f.name)
            report["errors"].append(str(e))
            continue
        known = "sha256 ok" if f.sha256 else "sha256 prefix ok" if f.sha256_prefix else "no known hash"
        print(f"fetched {f.name} -> {path} ({known}: {digest})")
        report["fetched"].append(f.name)
    return report


def _download(f: WeightFile, url: str, path: Path, progress: bool) -> str:
    """Stream ``url`` to a temporary sibling of ``path``; rename it there only if it is whole and its hash matches."""
    from sdatc.utils import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "sdatc-check-weights"})
    try:
        with atomic_path(path, keep_suffix=False) as tmp, urllib.request.urlopen(request, timeout=60) as response:
            kind = response.headers.get("Content-Type", "")
            if kind.startswith("text/html"):
                raise FetchFailed(f"{f.name}: {url} returned a web page (text/html), not the file")
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            h = hashlib.sha256()
            size = 0
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=f.name, leave=False, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    size += len(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            if total is not None and size != total:
                raise FetchFailed(f"{f.name}: incomplete download from {url}: {size} of {total} bytes")
            digest = h.hexdigest()
            expected = f.sha256 or f.sha256_prefix
            if expected and not digest.startswith(expected):
                shown = expected if f.sha256 else f"{expected}..."
                raise FetchFailed(f"{f.name}: sha256 mismatch: expected {shown}, got {digest} (from {url}); not kept")
    except urllib.error.HTTPError as e:
        raise FetchFailed(f"{f.name}: HTTP {e.code} {e.reason} from {url}") from None
    except urllib.error.URLError as e:
        raise FetchFailed(f"{f.name}: cannot reach {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # connection reset, timeout, malformed response
        raise FetchFailed(f"{f.name}: download from {url} failed: {e}") from None
    return digest
