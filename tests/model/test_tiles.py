"""attention.tiles: the hybrid window as blocks per axis of the latent grid, so one recipe value
keeps its share of the video at every resolution (a window in tokens does not)."""

from __future__ import annotations

import pytest
import torch

from hla_convert import HLAConfig, convert_attention, hla_parameters
from hla_convert.io.adapter import load_adapter, read_adapter_info, save_adapter
from hla_convert.model.config import ConfigError
from hla_convert.model.flops import attention_flops
from tiny_models import tiny_wan


def test_tiles_size_the_window_from_each_grid():
    """5 x 4 tiles through all frames: the recipes' numbers at Wan 480p and 720p and on the
    benchmark's 16^3 grid (where it is the measured [0, 4, 4] tile); uneven extents round up."""
    c = HLAConfig(kind="hybrid", tiles=[1, 5, 4])
    assert c.tiles == (1, 5, 4) and c.window == (1, 0, 0)
    assert c.window_on((21, 30, 52)) == (0, 6, 13)  # 480p: 6 x 13 x 21 = 1,638 keys, the own frame 1,560
    assert c.window_on((21, 45, 80)) == (0, 9, 20)  # 720p
    assert c.window_on((16, 16, 16)) == (0, 4, 4)
    assert c.window_on((3, 7, 1)) == (0, 2, 1)  # ceil(7 / 5), and more tiles than tokens: 1 token
    assert HLAConfig(kind="hybrid", window=(2, 0, 0)).window_on((21, 30, 52)) == (2, 0, 0)  # tokens stay tokens


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"tiles": [1, 5, 4], "window": [0, 4, 4]}, "set window .* or tiles .*, not both"),
        ({"tiles": [0, 5, 4]}, r"tiles: must be 3 integers >= 1 \(blocks per axis"),
        ({"tiles": [1, 5]}, r"tiles: must be 3 integers >= 1"),
        ({"tiles": [1, 5.0, 4]}, r"tiles: must be 3 integers >= 1"),
        ({"tiles": [1, 10**6, 4]}, "must be at most"),
    ],
)
def test_bad_tiles_are_one_clear_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        HLAConfig(kind="hybrid", **fields)


def test_configs_without_tiles_serialise_as_before():
    """Adapters and stage-checkpoint fingerprints of windows in tokens keep their JSON: `tiles`
    appears only where it is set (an earlier version reads the first, resumes from the second)."""
    assert "tiles" not in HLAConfig(kind="hybrid").to_dict()
    c = HLAConfig(kind="hybrid", tiles=(1, 2, 2))
    assert c.to_dict()["tiles"] == (1, 2, 2) and HLAConfig.from_json(c.to_json()) == c


def _inputs(side: int):
    g = torch.Generator().manual_seed(side)
    return dict(
        hidden_states=torch.randn(1, 4, 3, side, side, generator=g),  # patch 2: grid 3 x side/2 x side/2
        timestep=torch.tensor([400]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
    )


def _converted(config: HLAConfig, like=None):
    model = convert_attention(tiny_wan(), config)
    params = hla_parameters(model)
    with torch.no_grad():
        for name, p in params.items():
            if like is None:  # off the initial values, so equal outputs are not two untrained layers
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
            else:
                p.copy_(hla_parameters(like)[name])
    return model


def _out(model, side):
    with torch.no_grad():
        return model(**_inputs(side)).sample


def test_a_tiled_model_runs_the_window_of_each_grid_and_round_trips_through_its_adapter(tmp_path):
    """The same weights with tiles (1, 2, 2) equal the model with window (0, 2, 2) on a 3 x 4 x 4
    grid and (0, 4, 4) on 3 x 8 x 8 (bit for bit), and differ from a fixed window at the second;
    the adapter stores the tiles and loads back the same model."""
    tiled = _converted(HLAConfig(kind="hybrid", feature_dim=4, tiles=(1, 2, 2)))
    small = _converted(HLAConfig(kind="hybrid", feature_dim=4, window=(0, 2, 2)), like=tiled)
    large = _converted(HLAConfig(kind="hybrid", feature_dim=4, window=(0, 4, 4)), like=tiled)
    assert torch.equal(_out(tiled, 8), _out(small, 8))
    assert torch.equal(_out(tiled, 16), _out(large, 16))
    assert not torch.allclose(_out(tiled, 16), _out(small, 16))  # the token window does not follow the grid
    assert "tiles=(1, 2, 2)" in repr(tiled)

    save_adapter(tiled, tmp_path / "ad", base_source="tiny/wan")
    assert read_adapter_info(tmp_path / "ad")["config"]["tiles"] == [1, 2, 2]
    loaded = load_adapter(tiny_wan(), tmp_path / "ad")
    for side in (8, 16):
        assert torch.equal(_out(loaded, side), _out(tiled, side))


def test_flops_count_the_window_the_tiles_give():
    tiled = HLAConfig(kind="hybrid", tiles=(1, 5, 4))
    tokens = HLAConfig(kind="hybrid", window=(0, 6, 13))
    grid = (21, 30, 52)
    n = 21 * 30 * 52
    assert attention_flops(n, 12, 128, tiled, grid) == attention_flops(n, 12, 128, tokens, grid)
