"""Models packaged the Hugging Face way: save_pretrained -> from_pretrained (folder, hub cache),
the export command, refusals of broken folders, push_to_hub's calls."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from media_trees import tone
from safetensors.numpy import load_file, save_file

from clipsep_jax import checkpoints, evaluate
from clipsep_jax.config import default_config
from clipsep_jax.families.clipsep.separator import Separator
from clipsep_jax.separation import SeparationError

REPO = Path(__file__).resolve().parents[1]


def mixture():
    return (tone(3.0, 16000, 220, seed=1) + tone(3.0, 16000, 70, seed=2)) / 2


@pytest.fixture(scope="module")
def exported(trained_workdir, tmp_path_factory):
    """The trained run packaged by the export command."""
    folder = tmp_path_factory.mktemp("exported") / "tiny-clipsep"
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.export", f"--workdir={trained_workdir}",
         f"--output={folder}", "--checkpoint=latest"],
        capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_round_trip_gives_identical_separations(trained_workdir, exported, tmp_path):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "query_encoder"]
    saved = json.loads((exported / "config.json").read_text())
    assert saved["query"]["encoder_model"] == "query_encoder"  # the local CLIP travels along
    card = (exported / "README.md").read_text()
    assert "library_name: clipsep-jax" in card and "Trained for 250 steps" in card
    assert "training clips: 8" in card and "labels: accordion, tuba" in card
    assert "separator = get_family(config).separator(config, variables)" in card

    original = Separator.from_checkpoint(trained_workdir)
    loaded = Separator.from_pretrained(str(exported))
    queries = ["accordion", "tuba"]
    expected = original.separate_in_order(mixture(), 16000, queries)
    got = loaded.separate_in_order(mixture(), 16000, queries)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    # save_pretrained of a loaded model gives the same weights again
    again = loaded.save_pretrained(tmp_path / "again")
    first, second = load_file(str(exported / "model.safetensors")), load_file(
        str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_a_hub_id_loads_from_the_cache_offline(exported, tmp_path):
    """The Hugging Face cache layout (models--owner--name/snapshots/<commit>/), read with
    HF_HUB_OFFLINE=1 by the separate command given the hub id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-clipsep"
    shutil.copytree(exported, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sf.write(tmp_path / "mix.wav", mixture(), 16000, subtype="FLOAT")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.separate", "--checkpoint=someone/tiny-clipsep",
         f"--input={tmp_path / 'mix.wav'}", "--text=accordion", f"--output-dir={tmp_path / 'out'}"],
        capture_output=True, text=True, check=False, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    separated, rate = sf.read(tmp_path / "out" / "mix" / "accordion.wav")
    direct = Separator.from_pretrained(str(exported)).separate_in_order(
        mixture(), 16000, ["accordion"])[0]
    assert rate == 16000
    np.testing.assert_allclose(separated, direct, atol=1e-6)
    missing = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.separate", "--checkpoint=someone/not-cached",
         f"--input={tmp_path / 'mix.wav'}", "--text=accordion", f"--output-dir={tmp_path / 'o'}"],
        capture_output=True, text=True, check=False, cwd=REPO, env=env)
    assert missing.returncode == 2 and "someone/not-cached: cannot get it" in missing.stderr


def test_missing_or_mismatched_weights_are_refused_by_name(exported, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(exported, folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = "params/query_projection/dense/kernel"
    del weights[key]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(SeparationError, match=f"model.safetensors lacks: {key}"):
        Separator.from_pretrained(str(folder))
    weights[key] = np.zeros((3, 3), np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(SeparationError, match=rf"mis-shaped weights: {key} \(3, 3\)"):
        Separator.from_pretrained(str(folder))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SeparationError, match="not a readable safetensors file"):
        Separator.from_pretrained(str(folder))
    with pytest.raises(SeparationError, match="no such folder, and not a hub id"):
        Separator.from_pretrained(str(tmp_path / "nothing" / "here" / "at all"))


def test_evaluate_takes_a_pretrained_folder(exported, trained_workdir, tmp_path):
    config = checkpoints.load_config(trained_workdir)
    config.eval.split, config.eval.num_examples, config.eval.num_workers = "val", 4, 0
    config.eval.query_modes = "text"
    report, path = evaluate.run(config, str(tmp_path), str(exported), progress=False)
    assert path.name == "val_2src_tiny-clipsep.json"
    assert {row["query"] for row in report["rows"]} == {"mixture", "text"}


def test_push_to_hub_uploads_the_folder(exported, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.append(("create", repo_id, private, exist_ok, repo_type))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://huggingface.co/someone/tiny/commit/abc"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    separator = Separator.from_pretrained(str(exported))
    url = separator.push_to_hub("someone/tiny", private=True, token="t")
    assert url.endswith("/commit/abc")
    assert calls == [("token", "t"), ("create", "someone/tiny", True, True, "model"),
                     ("upload", "someone/tiny", ["README.md", "config.json", "model.safetensors",
                                                 "query_encoder"])]


def test_an_existing_folder_is_kept_unless_overwritten(exported, tmp_path):
    config, variables = checkpoints.load_pretrained(exported)
    clone = tmp_path / "clone"  # say, a git clone of the model's hub repository
    clone.mkdir()
    (clone / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (clone / "README.md").write_text("my own card")
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoints.save_pretrained(clone, config, variables)
    assert (clone / "README.md").read_text() == "my own card"
    checkpoints.save_pretrained(clone, config, variables, overwrite=True)
    assert (clone / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"
    assert "library_name: clipsep-jax" in (clone / "README.md").read_text()
    assert sorted(p.name for p in clone.iterdir()) == [
        ".gitattributes", "README.md", "config.json", "model.safetensors", "query_encoder"]
    with pytest.raises(SeparationError, match="runs/dem: no such file or folder"):
        os.makedirs(tmp_path / "runs", exist_ok=True)
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            Separator.from_checkpoint("runs/dem")  # a typo of a local path, not a hub id
        finally:
            os.chdir(cwd)


@pytest.mark.parametrize("kind,use", [
    ("clipsep_nit", "separator = get_family(config).separator(config, variables)"),
    ("weaksep", "separator = get_family(config).separator(config, variables)"),
    ("clipsonic", "generator = get_family(config).generator(config, variables)"),
    ("clap", 'config, variables = inference.load_for_inference("THIS_REPO_OR_FOLDER")'),
])
def test_the_card_says_how_to_use_each_kind(kind, use):
    card = checkpoints.model_card(default_config(kind))
    assert use in card and card.count("## Use") == 1
    assert ("separator" in card) == (kind in ("clipsep_nit", "weaksep"))
