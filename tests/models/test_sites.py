"""Sites and drivers: new modules as explicit children, no hooks, drivers equal diffusers' forwards,
insert/remove, checkpoints keyed by module path."""


import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from sdatc.config import load_config
from sdatc.errors import SdatcError
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.models.sites import (
    Ctx,
    Placement,
    Site,
    detached,
    insert,
    pretrained_state_dict,
    remove,
    sites,
    unet_forward,
    vae_decode,
    vae_encode,
)


def _no_hooks(model: nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    return [f"{n or 'root'}.{k}" for n, m in model.named_modules() for k in kinds if getattr(m, k, None)]


def test_no_hooks_anywhere_and_print_shows_every_new_module(tiny_model):
    assert _no_hooks(tiny_model) == []
    n_unet = len(tiny_model.unet.config.block_out_channels)
    n_vae = len(tiny_model.vae.config.block_out_channels)
    per_level = tiny_model.vae.config.layers_per_block + 1
    found = {"CAPM": 0, "STAM": 0, "CFW": 0}
    for _, site in sites(tiny_model):  # print shows each slot module inside the block it acts on
        text = repr(site)
        for slot in (site.pre, site.mid, site.post):
            for name, m in (slot or {}).items():
                assert f"({name}): {type(m).__name__}(" in text
                found[type(m).__name__] += 1
    assert found == {"CAPM": n_unet + n_vae, "STAM": 1 + n_vae * per_level, "CFW": len(tiny_model.cfg.cfw_levels)}
    assert "(capm): CAPM(" in repr(tiny_model) and "(stam): STAM(" in repr(tiny_model)
    # where they act, by name
    names = dict(tiny_model.named_modules())
    assert isinstance(names["unet.up_blocks.0.mid.capm"], nn.Module)
    assert isinstance(names["vae.decoder.mid_block.resnets.0.post.stam"], nn.Module)
    assert names[f"vae.decoder.up_blocks.{n_vae - 1 - 1}.mid.cfw"].level == 1


def test_drivers_equal_diffusers_forwards(tiny_model_config):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_model_config.backbone.unet).eval()
    vae = AutoencoderKL(**tiny_model_config.backbone.vae).eval()
    x, t = torch.randn(3, 4, 8, 12), torch.tensor([1, 500, 999])
    text = torch.randn(3, 77, unet.config.cross_attention_dim)
    img = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(unet_forward(unet, x, t, text, Ctx()), unet(x, t, encoder_hidden_states=text).sample)
        mode, feats = vae_encode(vae, img, levels=(1, 2))
        assert torch.equal(mode, vae.encode(img).latent_dist.mode())
        assert feats[1].shape == (2, vae.config.block_out_channels[1], 16, 24)
        assert torch.equal(vae_decode(vae, mode, Ctx()), vae.decode(mode).sample)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))

    def forward(self, h, ctx=None):
        return h * self.s


def test_insert_slots_order_and_remove_restores_the_tree(tiny_model_config):
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_model_config.backbone.vae).eval()
    keys, ref = set(vae.state_dict()), {k: v.clone() for k, v in vae.state_dict().items()}
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        plain = vae.decode(z).sample
        insert(vae, [Placement("decoder.up_blocks.0", "mid", "a", _Scale(1.0)),
                     Placement("decoder.up_blocks.0.resnets.0", "post", "b", _Scale(1.0))])
        site = vae.decoder.up_blocks[0]
        assert isinstance(site, Site) and isinstance(site.block.resnets[0], Site)
        assert site.block.upsamplers is None and site.resample is not None  # mid: before the upsampler
        assert "decoder.up_blocks.0.mid.a.s" in vae.state_dict()
        assert "decoder.up_blocks.0.resample.0.conv.weight" in vae.state_dict()
        assert torch.equal(vae_decode(vae, z, Ctx()), plain)  # identity modules: identical output
        site.mid["a"].s.fill_(2.0)  # the mid slot acts before the upsampler, on the whole level's output
        assert not torch.allclose(vae_decode(vae, z, Ctx()), plain)
        with detached(vae):
            assert set(vae.state_dict()) == keys and torch.equal(vae.decode(z).sample, plain)
        assert isinstance(vae.decoder.up_blocks[0], Site)  # put back
        assert set(pretrained_state_dict(vae)) == keys
        with pytest.raises(SdatcError, match="already holds"):
            insert(vae, [Placement("decoder.up_blocks.0", "post", "c", _Scale(1.0))])
        with pytest.raises(SdatcError, match="no module at"):
            insert(vae, [Placement("decoder.up_blocks.9", "post", "c", _Scale(1.0))])
        with pytest.raises(SdatcError, match="downsamplers"):
            insert(vae, [Placement("encoder.down_blocks.0", "mid", "c", _Scale(1.0))])
        remove(vae)
    state = vae.state_dict()
    assert set(state) == keys and all(torch.equal(state[k], ref[k]) for k in keys)


def test_saved_set_equals_trainable_set(tiny_model):
    saved = tiny_model.trainable_state_dict()
    params = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in tiny_model.named_buffers()} & set(saved)
    assert set(saved) == params | buffers


def test_model_save_writes_the_new_format_and_reloads(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "sdatc_modules.safetensors"))
    assert "unet.up_blocks.0.mid.capm.zero_out.weight" in keys and not any(k.startswith("capm_unet.") for k in keys)
    cfg = load_config(ModelConfig, tmp_path / "config.yaml")
    assert SDATC.from_config(cfg).load_trainable_state_dict(load_file(tmp_path / "sdatc_modules.safetensors")) is None


def test_chunks_refused_where_a_site_sits_inside_a_block(tiny_model):
    """SDATC's STAM sits inside the decoder's up blocks: chunking them would show STAM a chunk, not the window."""
    with pytest.raises(SdatcError, match="would see a chunk"):
        vae_decode(tiny_model.vae, torch.randn(2, 4, 4, 4), Ctx(num_frames=2, chunk=1))
