"""The Flax CLIP towers against transformers' PyTorch CLIP, loading, preprocessing and export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import relative_error, tiny_hf_config
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from clipsep_jax import clip as clip_lib
from clipsep_jax.clip import CLIP, byte_level_tokenizer


def save_tiny_torch_clip(folder, seed=0, safe_serialization=True, **overrides):
    """A random tiny transformers CLIPModel with a tokenizer and processor, saved to ``folder``."""
    tokenizer = byte_level_tokenizer()
    overrides.setdefault("text", {})["eos_token_id"] = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_hf_config(**overrides)).eval()
    # transformers' init leaves LayerNorms at 1/0 and the logit scale fixed: perturb them so
    # that a swapped weight/bias or a missed norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    tokenizer.save_pretrained(folder)
    size = model.config.vision_config.image_size
    CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    model, tokenizer = save_tiny_torch_clip(folder)
    return folder, model, tokenizer


def random_images(rng, sizes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_image_preprocessing_matches_transformers(tiny_clip):
    folder, _, _ = tiny_clip
    ours = CLIP.from_pretrained(str(folder))
    theirs = CLIPImageProcessorPil.from_pretrained(str(folder))
    rng = np.random.default_rng(0)
    for image in random_images(rng, [(90, 130), (131, 77), (64, 64), (40, 200), (300, 301)]):
        expected = theirs(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        cropped = ours.preprocessing.resize_and_crop(image)
        got = np.asarray(ours.preprocessing.normalize(jnp.asarray(cropped[None])))[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_embeddings_match_torch(tmp_path, safe_serialization):
    model, _ = save_tiny_torch_clip(tmp_path, seed=1, safe_serialization=safe_serialization)
    ours = CLIP.from_pretrained(str(tmp_path), batch_size=4)
    processor = CLIPImageProcessorPil.from_pretrained(str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))

    rng = np.random.default_rng(1)
    images = random_images(rng, [(80, 100)] * 3 + [(70, 64)] * 3)  # 6: two chunks of 4
    pixels = torch.from_numpy(
        np.stack([processor(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    )
    texts = [
        "a photo of accordion",
        "a photo of the small tuba.",
        "xylophone",
        "hi",
        "a low resolution photo of a acoustic guitar.",
    ]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        want_text = model.get_text_features(**tokens).pooler_output.numpy()

    got_image = ours.encode_image(images)
    got_text = ours.encode_text(texts)
    assert got_image.shape == (6, 40) and got_image.dtype == np.float32
    assert got_text.shape == (5, 40) and got_text.dtype == np.float32
    assert relative_error(got_image, want_image) <= 1e-4
    assert relative_error(got_text, want_text) <= 1e-4
    # Images of one size stacked in one array give the same result as a list.
    np.testing.assert_allclose(
        ours.encode_image(np.stack(images[:3])), got_image[:3], rtol=1e-6, atol=1e-6
    )


def test_legacy_eos_id_pools_at_the_largest_token(tmp_path):
    """Checkpoints with eos_token_id == 2 (the OpenAI ones) pool at argmax(input_ids)."""
    model, tokenizer = save_tiny_torch_clip(tmp_path, seed=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    ours = CLIP.from_pretrained(str(tmp_path))
    texts = ["a photo of cello", "violin"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model.get_text_features(**tokens).pooler_output.numpy()
    assert relative_error(ours.encode_text(texts), want) <= 1e-4


def test_sharded_over_eight_devices_matches_one(tiny_clip):
    folder, _, _ = tiny_clip
    if len(jax.local_devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh1 = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    one = CLIP.from_pretrained(str(folder), mesh=mesh1, batch_size=16)
    eight = CLIP.from_pretrained(str(folder), batch_size=16)
    assert eight.mesh.devices.size == 8
    images = random_images(np.random.default_rng(3), [(64, 80)] * 11)
    np.testing.assert_allclose(
        eight.encode_image(images), one.encode_image(images), rtol=1e-5, atol=1e-6
    )


def test_bfloat16_is_close_to_float32(tiny_clip):
    folder, _, _ = tiny_clip
    full = CLIP.from_pretrained(str(folder))
    half = CLIP.from_pretrained(str(folder), dtype="bfloat16")
    assert jax.tree_util.tree_leaves(half.params)[0].dtype == jnp.bfloat16
    images = random_images(np.random.default_rng(4), [(64, 64)] * 3)
    got = half.encode_image(images)
    assert got.dtype == np.float32
    assert relative_error(got, full.encode_image(images)) < 5e-2
    assert relative_error(half.encode_text(["flute"]), full.encode_text(["flute"])) < 5e-2


def test_prompts():
    assert clip_lib.text_prompt("acoustic_guitar") == "a photo of acoustic guitar"
    prompts = clip_lib.ensemble_prompts("tuba")
    assert prompts == [
        "a photo of tuba.",
        "a photo of the small tuba.",
        "a photo of the small tuba.",
        "a low resolution photo of a tuba.",
        "a photo of many tuba.",
    ]


def test_prompt_ensemble_is_the_mean(tiny_clip):
    folder, _, _ = tiny_clip
    ours = CLIP.from_pretrained(str(folder))
    got = ours.encode_prompt_ensemble(["tuba", "erhu"])
    want = np.stack(
        [ours.encode_text(clip_lib.ensemble_prompts(x)).mean(0) for x in ("tuba", "erhu")]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_random_clip_exports_to_transformers(tmp_path):
    """CLIP.random + save_pretrained gives a folder transformers loads to the same embeddings
    (the demo's path when no real weights are at hand)."""
    config = clip_lib.config_from_transformers(tiny_hf_config())
    ours = CLIP.random(config, seed=5)
    ours.save_pretrained(str(tmp_path / "exported"))
    model = transformers.CLIPModel.from_pretrained(str(tmp_path / "exported")).eval()
    reloaded = CLIP.from_pretrained(str(tmp_path / "exported"))
    images = random_images(np.random.default_rng(5), [(64, 64)] * 2)
    pixels = torch.from_numpy(
        np.asarray(ours.preprocessing.normalize(jnp.asarray(ours.preprocess(images))))
        .transpose(0, 3, 1, 2)
        .copy()
    )
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    assert relative_error(ours.encode_image(images), want) <= 1e-4
    np.testing.assert_array_equal(reloaded.encode_image(images), ours.encode_image(images))
    np.testing.assert_array_equal(reloaded.encode_text(["tuba"]), ours.encode_text(["tuba"]))


def test_bad_inputs_are_refused(tiny_clip, tmp_path):
    folder, _, _ = tiny_clip
    ours = CLIP.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="non-empty"):
        ours.encode_text(["tuba", ""])
    with pytest.raises(TypeError, match="list of strings"):
        ours.encode_text("tuba")
    with pytest.raises(ValueError, match="uint8"):
        ours.encode_image([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        empty = tmp_path / "no_weights"
        empty.mkdir()
        (empty / "config.json").write_text((folder / "config.json").read_text())
        CLIP.from_pretrained(str(empty))
    bad = tmp_path / "bad_shapes"
    save_tiny_torch_clip(bad, text={"hidden_size": 16, "intermediate_size": 32})
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["hidden_size"] = 32
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shape.*text_model"):
        CLIP.from_pretrained(str(bad))


def test_full_size_vit_b32_checkpoint_loads(tmp_path):
    """A ViT-B/32-sized random checkpoint (transformers' defaults) in float16 safetensors."""
    tokenizer = byte_level_tokenizer()
    config = transformers.CLIPConfig()  # ViT-B/32: 12+12 layers, 768/512 wide, 224 px, patch 32
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).half()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    CLIPImageProcessorPil().save_pretrained(tmp_path)
    del model
    for dtype, want in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        ours = CLIP.from_pretrained(str(tmp_path), dtype=dtype)
        params = ours.params
        assert params["vision_model"]["patch_embedding"]["kernel"].shape == (32, 32, 3, 768)
        assert params["text_model"]["token_embedding"]["embedding"].shape == (49408, 512)
        assert params["visual_projection"]["kernel"].shape == (768, 512)
        assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(want)}
        count = sum(x.size for x in jax.tree_util.tree_leaves(params))
        assert count == 151_277_313  # openai/clip-vit-base-patch32's parameter count
        embeddings = ours.encode_image([np.zeros((360, 480, 3), np.uint8)])
        assert embeddings.shape == (1, 512) and embeddings.dtype == np.float32
        assert np.isfinite(embeddings).all()
        assert ours.encode_text(["a photo of tuba"]).shape == (1, 512)
