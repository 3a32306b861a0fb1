"""Settings of ``scripts/reproduce_tables.py`` (configs/eval/tables.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from sdatc.config import check_device

# The paper's test sets: name -> packaged clip list (sdatc/data/clip_lists) and paper table.
SETS = {"REDS4": "reds4", "Vid4": "vid4", "UDM10": "udm10"}
TABLE_OF_SET = {"REDS4": "I", "Vid4": "I", "UDM10": "II"}
# Column order of sdatc/reference/paper_tables.csv, then our additions.
TABLE_METRICS = ("psnr_y", "ssim_y", "lpips", "dists", "fid", "niqe", "maniqa", "clipiqa")
EXTRA_METRICS = ("vmaf", "warping_error", "tlp", "tof")


@dataclasses.dataclass
class MethodConfig:
    """One restoration method: the built-in bicubic baseline or an inference config of infer.py."""

    builtin: Literal["bicubic"] | None = None
    infer_config: str | None = None  # e.g. configs/infer/sdatc.yaml
    overrides: list[str] = dataclasses.field(default_factory=list)  # InferConfig overrides
    checkpoint_dir: str | None = None  # trained modules under the weights folder (used when no checkpoint= is given)
    paper: str | None = None  # the paper's method to put beside it, with the difference (e.g. SDATC)
    label: str | None = None  # name in the tables (default: the method's key)

    def __post_init__(self):
        if (self.builtin is None) == (self.infer_config is None):
            raise ValueError("a method needs exactly one of builtin (bicubic) or infer_config")


@dataclasses.dataclass
class GTRoots:
    """GT root of each set: a folder of clip folders (BasicSR layout) or of videos."""

    REDS4: str | None = None  # may be REDS train_sharp itself: the 4 clips are picked from it
    Vid4: str | None = None
    UDM10: str | None = None


@dataclasses.dataclass
class FigureConfig:
    """The side-by-side grid and temporal profile of one clip (defaults: the first of each)."""

    enabled: bool = True
    set: str | None = None
    crf: int | None = None  # default: 25 when run, else the first CRF
    clip: str | None = None
    method: str | None = None  # "ours": default the first method other than bicubic that ran
    frame: int | None = None  # grid frame (default: the middle one)
    row: int | None = None  # temporal profile row in GT pixels, over the crop's columns (default: its middle row)
    crop: list[int] | None = None  # zoomed crop [y, x, h, w] in GT pixels (default: centre, 1/4 of each side)


@dataclasses.dataclass
class TablesConfig:
    """Build the test sets, restore them with each method, score, and write the paper's tables."""

    sets: list[str] = dataclasses.field(default_factory=lambda: list(SETS))
    crf: list[int] = dataclasses.field(default_factory=lambda: [15, 25, 35])
    gt_roots: GTRoots = dataclasses.field(default_factory=GTRoots)
    data_root: str | None = None  # else <data_root>/<set>/GT
    official_clips: bool = True  # take (and require) the paper's clips; false: every clip of the GT root
    max_frames: int | None = None  # first N frames of each clip (quick runs; not comparable to the paper)
    pix_fmt: Literal["yuv420p", "yuv444p"] = "yuv420p"
    testsets: str = "testsets"  # <testsets>/<set>/: LR, x264 clips, decoded frames, manifest
    results: str = "results"  # <results>/<method>/<set>/crf<q>/<clip>/%08d.png
    out: str = "results/tables"  # per_clip.csv, summary.csv, tables.json, tables.md, figures/, scores/
    methods: list[str] = dataclasses.field(default_factory=lambda: ["bicubic"])
    method_configs: dict[str, MethodConfig] = dataclasses.field(
        default_factory=lambda: {"bicubic": MethodConfig(builtin="bicubic")})
    infer_overrides: list[str] = dataclasses.field(default_factory=list)  # applied to every inference method
    metrics: list[str] = dataclasses.field(default_factory=lambda: [*TABLE_METRICS, *EXTRA_METRICS])
    weights: str | None = None  # offline weights folder (else $SDATC_WEIGHTS, else $TORCH_HOME)
    device: str = "auto"
    batch_size: int = 4
    runtime: bool = False  # also time runtime_method on runtime_size input (Table III)
    runtime_method: str = "sdatc"
    runtime_size: list[int] = dataclasses.field(default_factory=lambda: [180, 320])  # LR H, W (-> 720x1280)
    runtime_frames: int = 10
    runtime_overrides: list[str] = dataclasses.field(default_factory=list)
    figures: FigureConfig = dataclasses.field(default_factory=FigureConfig)

    def __post_init__(self):
        check_device(self.device)
        unknown = [s for s in self.sets if s not in SETS]
        if unknown:
            raise ValueError(f"unknown set {unknown[0]!r} (known: {', '.join(SETS)})")
        if not self.sets or not self.crf or not self.methods:
            raise ValueError("sets, crf and methods must not be empty")
        undefined = [m for m in self.methods if m not in self.method_configs]
        if undefined:
            raise ValueError(f"method {undefined[0]!r} is not defined in method_configs "
                             f"(defined: {', '.join(self.method_configs)})")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if len(self.runtime_size) != 2:
            raise ValueError(f"runtime_size must be [height, width], got {self.runtime_size}")

    def set_key(self, name: str) -> str:
        """Folder name of a set: the name, or ``<name>_first<N>`` for a max_frames run."""
        return name if self.max_frames is None else f"{name}_first{self.max_frames}"

    def label(self, method: str) -> str:
        return self.method_configs[method].label or method
