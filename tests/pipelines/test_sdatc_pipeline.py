"""sdatc.SDATCPipeline, the Python API: from_sd21, __call__ on arrays and PIL lists, save_pretrained /
from_pretrained (a folder and a Hub id from a hand-made cache, offline), restore_file, bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import sdatc
from sdatc.config import load_config
from sdatc.data.video import VideoReader, write_video
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig
from sdatc.models.sites import pretrained_state_dict
from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

TINY = "configs/model/sdatc_tiny.yaml"


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: socket connects fail, $SDATC_SD21_PATH unset


@pytest.fixture(scope="module")
def pipe():
    cfg = load_config(InferConfig, "configs/infer/tiny.yaml").pipeline
    p = sdatc.SDATCPipeline.from_sd21(None, model_config=TINY, config=cfg, allow_random_weights=True)
    p.progress = False
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking modules, so that the checks below can fail
        for q in p.model.trainable_parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.05)
    return p


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)


def test_call_on_arrays_and_pil_equals_the_restore_pipeline(pipe, frames):
    out = pipe(frames, num_inference_steps=2)
    assert out.shape == (3, 96, 128, 3) and out.dtype == np.uint8
    ref = np.stack(list(SDATCPipeline(pipe.model, pipe.config, progress=False).stream(iter(frames), 3)))
    assert np.array_equal(out, ref)
    pil = pipe([Image.fromarray(f) for f in frames], num_inference_steps=2, output_type="pil")
    assert len(pil) == 3 and pil[0].size == (128, 96) and np.array_equal(np.stack([np.asarray(i) for i in pil]), out)
    # the generator's seed drives the noise: same seed, same frames; another seed, other frames
    a = pipe(frames, num_inference_steps=2, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(a, pipe(frames, num_inference_steps=2, generator=torch.Generator().manual_seed(7)))
    assert not np.array_equal(a, out)
    assert not np.array_equal(pipe(frames, num_inference_steps=1), out)  # the step count reaches the sampler


def test_bad_frames_are_clear_errors(pipe):
    with pytest.raises(SdatcError, match=r"\(T, H, W, 3\)"):
        pipe(np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(SdatcError, match=r"\(T, H, W, 3\)"):  # one channel: refused here, not inside the DCM
        pipe(np.zeros((2, 24, 32, 1), np.uint8))
    with pytest.raises(SdatcError, match="uint8"):
        pipe(np.zeros((2, 24, 32, 3), np.float32))
    with pytest.raises(SdatcError, match="no frames"):
        pipe([])
    with pytest.raises(SdatcError, match="torch_dtype"):
        pipe.to(torch_dtype="fp8")


def test_save_and_load_a_pipeline_folder_and_hub_id(pipe, frames, tmp_path, monkeypatch, as_hub_cache):
    folder = pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "SDATCPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert sorted(p.name for p in (folder / "sdatc").iterdir()) == ["checksums.json", "config.yaml",
                                                                   "sdatc_modules.safetensors"]
    # unet/ is plain SD: diffusers loads it strictly, equal to the pipeline's frozen UNet
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    ours = pretrained_state_dict(pipe.model.unet)
    assert unet.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in unet.state_dict().items())
    expected = pipe(frames, num_inference_steps=2)
    loaded = sdatc.SDATCPipeline.from_pretrained(folder)
    loaded.progress = False
    assert np.array_equal(loaded(frames, num_inference_steps=2), expected)
    # the same folder as a Hub repo in the cache, offline
    as_hub_cache(folder, tmp_path / "hf" / "hub", repo="org/sdatc-tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = sdatc.SDATCPipeline.from_pretrained("org/sdatc-tiny")
    hub.progress = False
    assert np.array_equal(hub(frames, num_inference_steps=2), expected)
    with pytest.raises(SdatcError, match="not in the Hugging Face cache"):
        sdatc.SDATCPipeline.from_pretrained("org/missing")
    with pytest.raises(SdatcError, match="not a saved SDATCPipeline"):
        sdatc.SDATCPipeline.from_pretrained(tmp_path)


def test_from_sd21_needs_weights_unless_allowed():
    with pytest.raises(SdatcError, match="no SD 2.1 weights"):
        sdatc.SDATCPipeline.from_sd21(None, model_config=TINY)


def test_restore_file(pipe, frames, tmp_path):
    src = write_video(tmp_path / "in.mp4", frames, fps=25, crf=20)
    dst = pipe.restore_file(src, tmp_path / "out" / "x4.mp4")
    reader = VideoReader(dst)
    assert len(reader) == 3 and reader.meta.width == 128 and reader.meta.height == 96
    assert reader.meta.pix_fmt == "yuv420p"  # auto: 8-bit input, 8-bit output
    assert not list((tmp_path / "out").glob("*.tmp*"))
    ten = pipe.restore_file(src, tmp_path / "out" / "x4_10bit.mp4", pix_fmt="yuv420p10le")
    assert VideoReader(ten).meta.pix_fmt == "yuv420p10le"
    with pytest.raises(SdatcError, match="exists"):
        pipe.restore_file(src, dst)
    with pytest.raises(SdatcError, match="is the input"):
        pipe.restore_file(src, src, overwrite=True)


def _restored_by_file(pipe, src, monkeypatch, **settings) -> np.ndarray:
    """The frames ``restore_file`` hands its writer (before x264), for exact comparison with ``__call__``."""
    import sdatc.data.video

    seen = {}

    def capture(stream, src, dst, **kw):
        reader = VideoReader(src)
        seen["frames"] = np.stack(list(stream(reader, len(reader))))

    monkeypatch.setattr(sdatc.data.video, "write_restored", capture)
    pipe.restore_file(src, src.parent / "unused.mp4", **settings)
    return seen["frames"]


def test_restore_file_takes_the_settings_of_call(pipe, frames, tmp_path, monkeypatch):
    """restore_file ran the config's steps whatever one asked; now it takes __call__'s keywords."""
    src = write_video(tmp_path / "in.mp4", frames, fps=25, crf=20)
    clip = np.stack(list(VideoReader(src)))  # what restore_file decodes
    settings = dict(num_inference_steps=1, generator=torch.Generator().manual_seed(7), cfw_weight=0.3,
                    colour_fix="none")
    by_file = _restored_by_file(pipe, src, monkeypatch, **settings)
    settings["generator"] = torch.Generator().manual_seed(7)
    assert np.array_equal(by_file, pipe(clip, **settings))
    assert not np.array_equal(by_file, pipe(clip))  # the settings changed the result
    assert np.array_equal(_restored_by_file(pipe, src, monkeypatch), pipe(clip))  # none given: the config's
    with pytest.raises(TypeError, match="steps"):
        pipe.restore_file(src, tmp_path / "x.mp4", steps=2)


def _readme_python() -> str:
    """The Python snippet of README.md's "Restore" section."""
    import re

    from sdatc.config import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text()
    return re.search(r"```python\n(.+?)\n```", text.split("### Restore", 1)[1], re.S).group(1)


def test_readme_python_snippet_runs_without_weights(tmp_path, monkeypatch):
    """README's snippet, as written, in a fresh folder: the tiny model with random weights, no download."""
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(_readme_python(), "README.md", "exec"), scope)
    assert scope["hq"].shape == (5, 144, 256, 3) and scope["hq"].dtype == np.uint8
    assert VideoReader(tmp_path / "lq_x4.mp4").meta.width == 256
