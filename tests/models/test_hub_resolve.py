"""backbone.pretrained as a Hub repo id: resolved from a hand-made Hugging Face cache, never the network."""

import dataclasses

import pytest
import torch

from sdatc.errors import SdatcError
from sdatc.models import backbone as bb_mod
from sdatc.models.backbone import load_backbone, resolve_pretrained
from sdatc.models.sdatc import SDATC

REV = "0123456789abcdef0123456789abcdef01234567"  # as conftest.HUB_REV


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: socket connects fail, $SDATC_SD21_PATH unset


@pytest.fixture
def hub_cache(tiny_model_config, tmp_path, monkeypatch, as_hub_cache, write_sd_folder):
    unet, vae, embeds = write_sd_folder(tmp_path / "src", tiny_model_config.backbone)
    snapshot = as_hub_cache(tmp_path / "src", tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot, unet, vae, embeds


def test_hub_id_loads_from_the_cache_offline(tiny_model_config, hub_cache, monkeypatch):
    snapshot, unet, vae, embeds = hub_cache
    cfg = dataclasses.replace(tiny_model_config.backbone, pretrained="org/name")
    bb = load_backbone(cfg)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in bb.unet.state_dict().items())
    assert torch.equal(bb.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert torch.equal(bb.empty_prompt_embeds, embeds) and bb.text_encoder_params == 123
    assert bb.source == f"org/name@main ({snapshot})" and resolve_pretrained(cfg) == snapshot
    # a commit revision, and the id through $SDATC_SD21_PATH
    assert load_backbone(dataclasses.replace(cfg, pretrained=f"org/name@{REV}")).source.startswith(f"org/name@{REV} (")
    monkeypatch.setenv("SDATC_SD21_PATH", "org/name")
    assert resolve_pretrained(dataclasses.replace(cfg, pretrained=None)) == snapshot
    # the full model
    model = SDATC.from_config(dataclasses.replace(tiny_model_config, backbone=cfg))
    assert model.backbone_source == bb.source
    assert torch.equal(model.unet.conv_in.weight, unet.conv_in.weight)


def test_missing_hub_id_offline_and_missing_folder(tiny_model_config, hub_cache, tmp_path):
    cfg = dataclasses.replace(tiny_model_config.backbone, pretrained="org/missing")
    with pytest.raises(SdatcError) as e:
        load_backbone(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "org/missing@main" in msg
    assert "local diffusers folder (unet/ vae/ scheduler/" in msg and "Hub id" in msg and str(tmp_path / "hf") in msg
    with pytest.raises(SdatcError,
                       match="SD 2.1 folder not found: no such folder .*nope .*; get Stable Diffusion 2.1-base"):
        load_backbone(dataclasses.replace(cfg, pretrained=str(tmp_path / "nope")))


def test_online_hub_id_fetches_only_what_sdatc_needs(tiny_model_config, hub_cache, monkeypatch, capsys):
    snapshot = hub_cache[0]
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg = dataclasses.replace(tiny_model_config.backbone, pretrained="org/name@v1")
    assert resolve_pretrained(cfg) == snapshot and resolve_pretrained(cfg) == snapshot  # resolved once
    assert len(calls) == 1 and capsys.readouterr().out.startswith("fetching org/name@v1 from the Hugging Face Hub")
    repo, kw = calls[0]
    assert repo == "org/name" and kw["revision"] == "v1" and kw["local_files_only"] is False
    assert kw["cache_dir"] == str(snapshot.parents[2])
    pats = kw["allow_patterns"]
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/config.json", "scheduler/scheduler_config.json",
            "text_encoder/model.safetensors", "tokenizer/*"} <= set(pats)
    assert not any(p.endswith((".bin", ".ckpt")) or "fp16" in p for p in pats)
    assert bb_mod.hub_offline() is False


@pytest.mark.parametrize("value", ["weights/stable-diffusion-2-1-base", "./sd21", "../sd21/base", "/nonexistent/sd21",
                                   "~/no-such-sdatc-folder/sd21"])
def test_path_like_pretrained_is_never_a_hub_id(value, tiny_model_config, tmp_path, monkeypatch):
    """README: weights never download unless asked. A value starting with ./ ../ / ~, or whose first component
    is an existing folder (weights/ here), is a path: missing, it is one line, and the Hub is never asked."""
    import huggingface_hub

    work = tmp_path / "work"
    (work / "weights").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or str(tmp_path))
    cfg = dataclasses.replace(tiny_model_config.backbone, pretrained=value)
    with pytest.raises(SdatcError) as e:
        resolve_pretrained(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("SD 2.1 folder not found: no such folder")
    assert "nothing is downloaded" in msg
    assert calls == []
    assert bb_mod.is_local_path(value)
    assert not bb_mod.is_local_path("stabilityai/stable-diffusion-2-1-base")  # no such local folder: a Hub id
