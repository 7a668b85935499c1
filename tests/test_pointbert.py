"""PointBERTEncoder: grouping on hand-checked clouds, shapes, PointLLM checkpoint loading (strict, safe), save/load."""

import argparse

import pytest
import torch

from cgmllm import PointBERTConfig, PointBERTEncoder
from cgmllm.modeling_pointbert import farthest_point_sample, group_points, normalize_point_cloud


TINY = dict(trans_dim=16, depth=2, num_heads=2, group_size=4, num_group=8, encoder_dims=12, point_dims=6)


def _tiny_encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    model = PointBERTEncoder(PointBERTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained file has
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def _cloud(batch=2, points=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, points, 3, generator=generator)
    rgb = torch.rand(batch, points, 3, generator=generator)
    return normalize_point_cloud(torch.cat([xyz, rgb], dim=-1))


def test_farthest_point_sampling_on_a_line_starts_at_index_0():
    # x = 0, 1, 2, 10, 5: from 0 the farthest is 10 (index 3), then 5 (index 4: 5 from both), then 2 (index 2).
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [10, 0, 0], [5, 0, 0]]])
    assert farthest_point_sample(xyz, 4).tolist() == [[0, 3, 4, 2]]
    assert farthest_point_sample(xyz, 2, start_index=3).tolist() == [[3, 0]]


def test_grouping_centres_xyz_and_keeps_rgb():
    # Two clusters far apart; 2 groups of 3: each group is one cluster, xyz relative to its FPS centre.
    xyz = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [5, 5, 5], [5.1, 5, 5], [5, 5.1, 5]])
    rgb = torch.arange(18, dtype=torch.float32).view(6, 3) / 18
    groups, centres = group_points(torch.cat([xyz, rgb], -1)[None], num_group=2, group_size=3)
    torch.testing.assert_close(centres[0], xyz[[0, 4]])  # point 0, then the farthest from it (4 before 5: a tie)
    for group, members, centre in ((0, [0, 1, 2], 0), (1, [3, 4, 5], 4)):
        expected = torch.cat([xyz[members] - xyz[centre], rgb[members]], -1)
        got = groups[0, group]
        order = got[:, 3].argsort()  # the rgb values are distinct: sort the unordered group by them
        torch.testing.assert_close(got[order], expected)


def test_normalize_point_cloud_is_pointllm_pc_norm():
    points = torch.tensor([[1.0, 0, 0, 0.2, 0.3, 0.4], [3, 0, 0, 0.5, 0.6, 0.7], [2, 1, 0, 0.1, 0.1, 0.1]])
    out = normalize_point_cloud(points)
    # mean (2, 1/3, 0); largest radius sqrt(1 + 1/9) (points 0 and 1), rgb untouched.
    radius = (1 + 1 / 9) ** 0.5
    torch.testing.assert_close(out[:, :3], (points[:, :3] - torch.tensor([2, 1 / 3, 0])) / radius)
    torch.testing.assert_close(out[:, 3:], points[:, 3:])


def test_encoder_output_shape_cls_first_and_deterministic():
    model = _tiny_encoder()
    cloud = _cloud()
    with torch.no_grad():
        features = model(cloud)
        again = model(cloud)
    assert features.shape == (2, 1 + TINY["num_group"], TINY["trans_dim"])
    torch.testing.assert_close(features, again, rtol=0, atol=0)
    # Each cloud is encoded on its own: batch row 1 equals a batch of one.
    with torch.no_grad():
        single = model(cloud[1:])
    torch.testing.assert_close(features[1:], single, rtol=1e-5, atol=1e-5)


def test_encoder_is_invariant_to_the_order_of_points_after_the_first():
    """FPS starts at point 0; any permutation that keeps point 0 first gives the same features."""
    model = _tiny_encoder()
    cloud = _cloud(batch=1)
    permutation = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(63, generator=torch.Generator()
                                                                               .manual_seed(1)) + 1])
    with torch.no_grad():
        torch.testing.assert_close(model(cloud), model(cloud[:, permutation]), rtol=1e-5, atol=1e-5)


def test_encoder_equals_a_direct_computation():
    """The forward written out with plain tensor ops on the encoder's own weights."""
    model = _tiny_encoder(seed=3)
    cloud = _cloud(batch=1, seed=3)
    groups, centres = group_points(cloud, TINY["num_group"], TINY["group_size"])
    with torch.no_grad():
        enc = model.encoder
        x = groups[0].transpose(1, 2)  # (G, C, k)
        h = enc.first_conv(x)
        h = torch.cat([h.max(2, keepdim=True).values.expand_as(h), h], 1)
        tokens = model.reduce_dim(enc.second_conv(h).max(2).values)[None]
        x = torch.cat([model.cls_token, tokens], 1)
        pos = torch.cat([model.cls_pos, model.pos_embed(centres)], 1)
        heads, dim = TINY["num_heads"], TINY["trans_dim"]
        for block in model.blocks.blocks:
            x = x + pos
            q, k, v = block.attn.qkv(block.norm1(x)).view(1, -1, 3, heads, dim // heads).unbind(2)
            weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / (dim // heads) ** 0.5, -1)
            x = x + block.attn.proj(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, -1, dim))
            hidden = block.mlp.fc1(block.norm2(x))
            x = x + block.mlp.fc2(0.5 * hidden * (1 + torch.erf(hidden / 2**0.5)))
        expected = model.norm(x)
        torch.testing.assert_close(model(cloud), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, match", [((1, 64, 3), r"\(batch, num_points, 6\)"), ((64, 6), "got \\(64, 6\\)"),
                                          ((1, 5, 6), "at least 8 points")])
def test_bad_clouds_are_clear_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        _tiny_encoder()(torch.zeros(shape))


def test_released_configuration_has_the_pointllm_keys():
    with torch.device("meta"):
        model = PointBERTEncoder(PointBERTConfig())
    state = model.state_dict()
    assert len(state) == 160  # incl. BatchNorm statistics (official_pointbert_and_data.md)
    assert tuple(state["encoder.first_conv.0.weight"].shape) == (128, 6, 1)
    assert tuple(state["blocks.blocks.11.attn.qkv.weight"].shape) == (3 * 1152, 1152)
    assert "blocks.blocks.0.attn.qkv.bias" not in state


def _write_pointllm_file(path, model, extra=None, prefix="module.point_encoder."):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    state.update({"module.pc_projection": torch.zeros(16, 8), "module.logit_scale": torch.tensor(1.0)})
    torch.save({"state_dict": state, "epoch": 3, **(extra or {})}, path)


def test_from_pointllm_loads_the_encoder_and_drops_the_rest(tmp_path):
    source = _tiny_encoder(seed=5)
    _write_pointllm_file(tmp_path / "point_bert.pt", source)
    loaded = PointBERTEncoder.from_pointllm(tmp_path / "point_bert.pt", **TINY)
    cloud = _cloud()
    with torch.no_grad():
        torch.testing.assert_close(loaded(cloud), source(cloud), rtol=0, atol=0)
    assert not loaded.training


def test_from_pointllm_clear_errors(tmp_path):
    source = _tiny_encoder()
    torch.save({"model": source.state_dict()}, tmp_path / "no_state_dict.pt")
    with pytest.raises(ValueError, match="'state_dict'"):
        PointBERTEncoder.from_pointllm(tmp_path / "no_state_dict.pt", **TINY)
    _write_pointllm_file(tmp_path / "other_prefix.pt", source, prefix="module.encoder.")
    with pytest.raises(ValueError, match="module.point_encoder."):
        PointBERTEncoder.from_pointllm(tmp_path / "other_prefix.pt", **TINY)
    _write_pointllm_file(tmp_path / "ok.pt", source)
    with pytest.raises(ValueError, match="shape mismatches.*trans_dim|file \\("):
        PointBERTEncoder.from_pointllm(tmp_path / "ok.pt", **{**TINY, "trans_dim": 32})
    with pytest.raises(ValueError, match="Unknown PointBERT settings \\['width'\\]"):
        PointBERTEncoder.from_pointllm(tmp_path / "ok.pt", width=3)
    with pytest.raises(ValueError, match="No PointBERT checkpoint"):
        PointBERTEncoder.from_pointllm(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PointLLM PointBERT checkpoint"):
        PointBERTEncoder.from_pointllm(tmp_path / "text.pt")


def test_from_pointllm_refuses_pickled_objects_by_name(tmp_path):
    _write_pointllm_file(tmp_path / "ulip.pt", _tiny_encoder(), extra={"args": argparse.Namespace(lr=1e-3)})
    with pytest.raises(ValueError, match="argparse.Namespace"):
        PointBERTEncoder.from_pointllm(tmp_path / "ulip.pt", **TINY)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = _tiny_encoder(seed=7)
    model.save_pretrained(tmp_path / "pb")
    assert (tmp_path / "pb" / "modeling_pointbert.py").is_file()  # remote code travels with the weights
    loaded = PointBERTEncoder.from_pretrained(tmp_path / "pb").eval()
    cloud = _cloud()
    with torch.no_grad():
        torch.testing.assert_close(loaded(cloud), model(cloud), rtol=0, atol=0)
