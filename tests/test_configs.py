"""Every config in configs/ loads, validates, overrides from the command line, refuses typos."""

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from clipsep_jax.config import default_config, validate

# from_workdir.py reads a run's saved config (tested with the evaluation command).
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "from_workdir")


def parse(*argv):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["main", *argv])
    return values.config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_names_every_field(path):
    config = parse(f"--config={path}")
    validate(config)
    # every section of the schema for its kind: the shared ones and its family's
    assert set(config.to_dict()) == set(default_config(config.model.kind).to_dict())
    assert config.data.name in path.stem or (
        path.stem.endswith("demo") and config.data.name == "synth_music")


PRINT_CONFIG = """
from absl import app
from ml_collections import config_flags
CONFIG = config_flags.DEFINE_config_file("config")
app.run(lambda _: print(CONFIG.value.train.batch_size, CONFIG.value.model.num_mask_channels,
                        CONFIG.value.model.kind))
"""


def test_command_line_overrides_and_unknown_keys():
    """Overrides as ``python -m clipsep_jax.main`` takes them (absl's global flags)."""
    path = next(p for p in CONFIGS if p.stem == "vggsound_nit")
    run = lambda *argv: subprocess.run([sys.executable, "-c", PRINT_CONFIG, *argv],
                                       capture_output=True, text=True, check=False)
    result = run(f"--config={path}", "--config.train.batch_size=8",
                 "--config.model.num_mask_channels=16")
    assert result.stdout.split() == ["8", "16", "clipsep_nit"], result.stderr
    result = run(f"--config={path}", "--config.train.batchsize=8")
    assert result.returncode != 0
    assert 'Did you mean "batch_size"' in result.stderr


def test_expected_variants_exist():
    stems = {p.stem for p in CONFIGS}
    assert {"music_clipsep", "music_clipsep_text", "music_clipsep_hybrid", "music_pit",
            "music_labelsep", "vggsound_clipsep", "vggsound_nit", "vggsound_pit",
            "music_clipsonic", "vggsound_clipsonic", "clipsonic_demo", "music_hifigan",
            "vocoder_demo", "prior_demo"} <= stems
