"""Shared test helpers."""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# Eight emulated CPU devices, so that mesh and sharding tests run on this machine; set before
# any test module imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Programs compiled once are reused by later tests and by the tests' subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"clipsep-jax-test-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# The PyTorch rendition of the reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error relative to the signal's scale."""
    actual = np.asarray(actual).astype(np.complex128)  # complex: compare both parts
    expected = np.asarray(expected).astype(np.complex128)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def tiny_hf_config(**overrides):
    """A small transformers CLIPConfig (2 + 2 layers, 64 px images, 40-dim embeddings)."""
    import transformers

    text = dict(
        vocab_size=600,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=40, **overrides
    )


# Session fixtures: a generated dataset prepared with data_prep and a tiny model trained on it,
# shared by the training, separation and evaluation tests.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A random tiny CLIP checkpoint folder (40-dim embeddings) that transformers can load."""
    from clipsep_jax.clip import CLIP, config_from_transformers

    folder = tmp_path_factory.mktemp("session_clip") / "clip"
    CLIP.random(config_from_transformers(tiny_hf_config())).save_pretrained(str(folder))
    return str(folder)


# A small ResNet of torchvision's layout (one block per stage, 128-wide vectors) and a small BERT
# (32-wide vectors): the SOP and BERTSep baselines' encoders in the session dataset.
TINY_RESNET = dict(blocks=(1, 1, 1, 1), widths=(16, 32, 64, 128))
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
BERT_WORDS = ["accordion", "tuba", "acoustic", "guitar", "violin", "cello", "flute", "the",
              "sound", "of", "a", "photo", "playing"]


def save_tiny_resnet(path, seed=0, **sizes):
    """torchvision-layout weights of a random ResNet, saved with torch.save (a .pth file)."""
    import torch
    import torch_reference as tr

    torch.manual_seed(seed)
    net = tr.ResNet(**{**TINY_RESNET, **sizes})
    torch.save(net.state_dict(), path)
    return net


def save_tiny_bert(folder, seed=0, safe_serialization=True, **sizes):
    """A random transformers BertModel with a WordPiece tokenizer, saved to ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS, *letters]
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), **{**TINY_BERT, **sizes})
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("session_resnet") / "resnet-tiny.pth"
    save_tiny_resnet(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("session_bert") / "bert"
    save_tiny_bert(folder)
    return str(folder)


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory, tiny_clip_folder, tiny_resnet_file, tiny_bert_folder):
    """data_prep's output for generated tones with class-coloured frames (music builder), with
    the SOP and BERTSep baselines' ResNet frame vectors and BERT label vectors."""
    from generated_data import clean_tree

    from data_prep import build

    root = tmp_path_factory.mktemp("generated_in")
    clean_tree(root)
    out = tmp_path_factory.mktemp("generated_data")
    build.run(["--dataset=music", f"--manual_dir={root}", f"--data_dir={out}",
               f"--clip={tiny_clip_folder}", "--min_samples=16383",
               f"--resnet={tiny_resnet_file}", f"--bert={tiny_bert_folder}"])
    return str(out)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, generated_dataset, tiny_clip_folder):
    """A tiny CLIPSep trained for 250 steps with image queries on the generated dataset."""
    from generated_data import tiny_config

    from clipsep_jax import train

    config = tiny_config(generated_dataset, num_steps=250, checkpoint_every_steps=250,
                         validation_every_steps=250, learning_rate=3e-3)
    config.query.encoder_model = tiny_clip_folder
    workdir = tmp_path_factory.mktemp("trained")
    with open(workdir / "config.json", "w") as f:
        f.write(config.to_json_best_effort())
    train.train_and_evaluate(config, str(workdir))
    return str(workdir)


def tiny_clipsonic(data_dir="", **train_overrides):
    """A CLIPSonic config small enough for the tests."""
    from clipsep_jax.config import default_config

    config = default_config("clipsonic")
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.model.widths = (16, 32)
    config.model.blocks_per_level = 1
    config.model.embedding_dim = 32
    config.model.condition_dim = 40  # the tests' tiny CLIP
    config.clipsonic.mel.n_mels = 32
    config.audio.crop_samples = 16383  # 64 mel frames
    config.train.batch_size = 8
    config.train.learning_rate = 3e-3
    config.train.lr_warmup_steps = 5
    config.train.ema_decay = 0.0
    config.train.log_every_steps = 1
    config.train.validation_every_steps = 1000
    config.mesh.fsdp_min_size = 64
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="session")
def trained_clipsonic(generated_dataset, tiny_clip_folder, tmp_path_factory):
    """A tiny CLIPSonic model trained 60 steps: (config, workdir), shared by the CLIPSonic and
    vocoder tests."""
    from clipsep_jax import checkpoints, train

    config = tiny_clipsonic(generated_dataset, num_steps=60, checkpoint_every_steps=60)
    config.query.encoder_model = tiny_clip_folder
    workdir = tmp_path_factory.mktemp("clipsonic")
    checkpoints.write_config(workdir, config)
    train.train_and_evaluate(config, str(workdir))
    return config, workdir
