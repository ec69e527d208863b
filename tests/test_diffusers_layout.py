"""Our network against diffusers' UniDiffuserModel with identical weights (the Hub's unet layout)."""

import pytest
import torch

from unidiffuser.network import UViT
from unidiffuser.official import (
    config_from_diffusers,
    from_diffusers_keys,
    load_state_dict_strict,
    to_diffusers_keys,
)


@pytest.fixture(scope="module")
def pair():
    from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel

    torch.manual_seed(0)
    theirs = UniDiffuserModel(
        text_dim=8, clip_img_dim=12, num_text_tokens=6, num_attention_heads=4, attention_head_dim=16,
        in_channels=4, out_channels=4, num_layers=4, sample_size=8, patch_size=2, activation_fn="gelu",
        norm_type="layer_norm", block_type="unidiffuser", pre_layer_norm=False, use_data_type_embedding=True,
        ff_final_dropout=True,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in theirs.parameters():  # every weight random, none left at an init of 0 or 1
            p.copy_(torch.randn_like(p) * 0.1)
        theirs.transformer.pos_embed.proj.weight.copy_(theirs.vae_img_in.proj.weight)
        theirs.transformer.pos_embed.proj.bias.copy_(theirs.vae_img_in.proj.bias)
    ours = UViT(config_from_diffusers(theirs.config)).eval()
    load_state_dict_strict(ours, from_diffusers_keys(theirs.state_dict()), "diffusers UniDiffuserModel")
    return theirs, ours


def test_config_maps_to_the_same_architecture(pair):
    theirs, ours = pair
    assert ours.config.width == 64 and ours.config.depth == 4 and len(ours.in_blocks) == 2
    assert (
        ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) - 4 * 4 * 64 - 64
    )  # unused copy


def test_forward_equals_diffusers(pair):
    """At the trained size only: diffusers' model does not resize its position embeddings."""
    size = 8
    theirs, ours = pair
    g = torch.Generator().manual_seed(size)
    img = torch.randn(3, 4, size, size, generator=g)
    clip = torch.randn(3, 1, 12, generator=g)
    text = torch.randn(3, 6, 8, generator=g)
    t_img, t_text = torch.tensor([0.0, 1000.0, 437.25]), torch.tensor([1000.0, 0.0, 12.5])
    data_type = torch.tensor([0, 1, 1])
    with torch.no_grad():
        a_img, a_clip, a_text = theirs(img, clip, text, t_img, t_text, data_type=data_type)
        out = ours(
            {"img": img, "clip_img": clip[:, 0], "text": text, "data_type": data_type},
            {"image": t_img, "text": t_text},
        )
    for a, b in ((a_img, out["img"]), (a_clip[:, 0], out["clip_img"]), (a_text, out["text"])):
        assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_key_maps_round_trip(pair):
    theirs, ours = pair
    back = to_diffusers_keys(ours.state_dict())
    original = theirs.state_dict()
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k


def test_broken_diffusers_state_dict_is_named(pair):
    theirs, ours = pair
    sd = dict(theirs.state_dict())
    sd.pop("transformer.transformer_in_blocks.0.attn1.to_k.weight")
    with pytest.raises(ValueError, match=r"has only some of to_q/to_k/to_v\.weight"):
        from_diffusers_keys(sd)
    sd = dict(theirs.state_dict())
    sd.pop("text_out.bias")
    with pytest.raises(ValueError, match=r"diffusers UniDiffuserModel layout.*missing \['head.text.bias'\]"):
        load_state_dict_strict(UViT(ours.config), from_diffusers_keys(sd), "diffusers UniDiffuserModel")
