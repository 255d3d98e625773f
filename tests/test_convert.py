"""Checkpoint conversion: refusals by key name, the orbax round trip, the command line."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch_reference as tr

from clipsep_jax import checkpoints, convert
from clipsep_jax.models import forward

SMALL = dict(layers=5, ngf=8, channels=4)


def save(state, path):
    torch.save(state, path)
    return path


@pytest.fixture
def small_state():
    torch.manual_seed(0)
    return tr.CLIPSepNIT(**SMALL).state_dict()


@pytest.mark.parametrize("kind,cls,extra", [
    ("clipsep", tr.CLIPSep, {}),
    ("clipsep_nit", tr.CLIPSepNIT, {}),
    ("pit", tr.PITSep, {}),
    ("labelsep", tr.LabelSep, {"n_labels": 7}),
])
def test_sizes_are_read_from_the_checkpoint(kind, cls, extra, tmp_path):
    state = cls(layers=6, ngf=8, channels=5, **extra).state_dict()
    config, variables = convert.load_reference_checkpoint(save(state, tmp_path / "c.pt"), kind)
    assert (config.model.kind, config.model.num_downs, config.model.base_width,
            config.model.num_mask_channels) == (kind, 6, 8, 5)
    if kind == "labelsep":
        assert config.model.num_labels == 7
    converted = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
    reference = cls(layers=6, ngf=8, channels=5, **extra)
    assert converted == sum(p.numel() for p in reference.parameters())


def test_missing_key_is_named(small_state, tmp_path):
    del small_state["sound_net.unet_block.model.1.model.2.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'sound_net\.unet_block\.model\.1\.model\.2"
                                         r"\.running_var'"):
        convert.load_reference_checkpoint(save(small_state, tmp_path / "c.pt"), "clipsep_nit")


def test_unexpected_key_is_named(small_state, tmp_path):
    small_state["extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unexpected key.*extra_head.weight"):
        convert.load_reference_checkpoint(save(small_state, tmp_path / "c.pt"), "clipsep_nit")


def test_checkpoint_of_another_kind_is_refused(small_state, tmp_path):
    path = save(small_state, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="unexpected key.*pit_nets.0.bias"):
        convert.load_reference_checkpoint(path, "clipsep")


def test_wrong_shape_is_named(small_state, tmp_path):
    small_state["synth_net.scale"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"'synth_net\.scale' has shape \(7,\)"):
        convert.load_reference_checkpoint(save(small_state, tmp_path / "c.pt"), "clipsep_nit")


def test_non_tensor_pickles_and_missing_files_are_refused(tmp_path):
    torch.save({"frame_net.weight": "not a tensor"}, tmp_path / "strings.pt")
    with pytest.raises(ValueError, match="not a tensor"):
        convert.read_state_dict(tmp_path / "strings.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable PyTorch weights file"):
        convert.read_state_dict(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        convert.read_state_dict(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="model_kind='sepformer'"):
        convert.infer_config({}, "sepformer")


def test_orbax_round_trip_and_command_line(small_state, tmp_path):
    path = save({"module." + k: v for k, v in small_state.items()}, tmp_path / "nit.pt")
    output = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.convert", f"--checkpoint={path}",
         "--model_kind=clipsep_nit", f"--output={output}"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "clipsep_nit, 5 levels, width 8, k 4" in result.stdout
    config, variables = checkpoints.load_model(output)
    expected_config, expected = convert.load_reference_checkpoint(path, "clipsep_nit")
    assert config.to_dict() == expected_config.to_dict()
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)

    rng = np.random.default_rng(0)
    mag_mix = rng.gamma(0.5, 1.0, (1, 513, 32)).astype(np.float32)
    queries = rng.normal(size=(1, 2, 512)).astype(np.float32)
    out = forward(config, variables, mag_mix, queries)
    assert out["query_logits"].shape == (1, 2, 256, 32)

    again = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.convert", f"--checkpoint={path}",
         "--model_kind=clipsep_nit", f"--output={output}"],
        capture_output=True, text=True, check=False,
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.convert", f"--checkpoint={path}",
         "--model_kind=pit", f"--output={tmp_path / 'other'}"],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode == 1 and "missing key 'synth_net.weight'" in bad.stderr
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
