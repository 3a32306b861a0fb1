"""Third-party quality networks (pyiqa, torchvision, CLIP, timm) built strictly offline from the weights folder.

    net = create_pyiqa("clipiqa", device="cpu", weights=Path("weights"))   # pyiqa.create_metric, offline

Used by the learned metrics (``sdatc/metrics/learned.py``, ``temporal.py``) and by UltraVSR's DRS estimator
(``sdatc/pipelines/drs.py``). pyiqa, torchvision and CLIP fetch their weights on first use. Inside
:func:`offline_loading`:

* torch hub's folder is ``<root>/hub`` (torchvision: ``hub/checkpoints``, CLIP: ``hub/clip``) and
  pyiqa's cache is ``<root>/hub/pyiqa``; Hugging Face is in offline mode;
* any attempt to download raises MetricUnavailable naming the URL and the file it wanted
  (callers check for the files first, so this is a safety net, never a normal path);
* every ``torch.load`` reads with ``weights_only=True`` (no pickled code runs), whatever the caller
  asked for;
* optionally timm builds without pretrained weights (MANIQA's checkpoint holds its whole ViT).

The patches are undone on exit. Not thread-safe: build metrics from one thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.hub

from sdatc.errors import MetricUnavailable
from sdatc.weights import WeightsMissing, require, resolve_root

# pyiqa metric name behind each of our names.
PYIQA_NAMES = {"lpips": "lpips", "dists": "dists", "niqe": "niqe", "maniqa": "maniqa", "clipiqa": "clipiqa",
               "fid": "fid"}


def _no_download(url, dst=None, *args, **kwargs):
    where = f" to {dst}" if dst else ""
    raise MetricUnavailable(f"refusing to download {url}{where} (offline: put the file there yourself)")


def _no_urlopen(url, *args, **kwargs):
    target = getattr(url, "full_url", url)
    raise MetricUnavailable(f"refusing to open {target} (offline)")


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def offline_loading(root: Path, timm_pretrained: bool = True, quiet: bool = True) -> Iterator[None]:
    """Context in which pyiqa / torchvision / CLIP read weights from ``root`` only (see module doc)."""
    import huggingface_hub.constants as hf_constants
    import pyiqa.utils.download_util as pyiqa_dl

    real_load = torch.load

    def safe_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    hub = Path(root) / "hub"
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.hub, "_hub_dir", str(hub)))
        stack.enter_context(_patched(pyiqa_dl, "DEFAULT_CACHE_DIR", str(hub / "pyiqa")))
        stack.enter_context(_patched(torch.hub, "download_url_to_file", _no_download))
        stack.enter_context(_patched(pyiqa_dl, "download_url_to_file", _no_download))
        stack.enter_context(_patched(urllib.request, "urlopen", _no_urlopen))
        stack.enter_context(_patched(hf_constants, "HF_HUB_OFFLINE", True))
        stack.enter_context(_patched(torch, "load", safe_load))
        stack.enter_context(_env("HF_HUB_OFFLINE", "1"))
        if not timm_pretrained:
            import timm

            real_create = timm.create_model
            def create(name, *a, pretrained=False, **kw):
                return real_create(name, *a, pretrained=False, **kw)

            stack.enter_context(_patched(timm, "create_model", create))
        if quiet:  # pyiqa prints "Loading pretrained model ..." and logs "Metric [...] is created"
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            logger = logging.getLogger("pyiqa")
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.WARNING)
        yield


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def create_pyiqa(name: str, device: torch.device | str = "cpu", weights: Path | None = None, user: str | None = None):
    """pyiqa.create_metric(name) built offline from the weights folder (``weights``, else the default root), on
    ``device``, in eval mode. ``user``: the metric that needs this network (named when weights are missing).

    Raises:
        MetricUnavailable: its files are missing or do not load, or pyiqa does not import.
    """
    root = weights or resolve_root(None)
    try:
        require(name, root)
    except WeightsMissing as e:
        raise MetricUnavailable(f"{user} (uses {e})" if user else str(e)) from None
    try:
        import pyiqa
    except ImportError as e:
        raise MetricUnavailable(f"{user or name}: pyiqa does not import ({e}); run bash scripts/setup.sh") from None

    with offline_loading(root, timm_pretrained=name != "maniqa"):
        try:
            metric = pyiqa.create_metric(PYIQA_NAMES[name], device=torch.device(device))
        except MetricUnavailable:
            raise
        except Exception as e:  # an unreadable or mismatching file: say which metric and why
            raise MetricUnavailable(f"{name}: cannot load its weights from {root}: {type(e).__name__}: {e}") from None
    return metric.eval()
