"""The paper's remaining baselines: SOP (frozen ImageNet ResNet-18 frame vectors), BERTSep (BERT
label vectors), and the reference's drop_closest."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference as tr
from conftest import TINY_RESNET, relative_error, save_tiny_bert, save_tiny_resnet
from generated_data import tiny_config
from safetensors.torch import save_file

from clipsep_jax import checkpoints, convert, train
from clipsep_jax.config import default_config, from_dict
from clipsep_jax.encoders import load_query_encoder
from clipsep_jax.encoders.bert import BERT
from clipsep_jax.encoders.clip import ImagePreprocessing
from clipsep_jax.encoders.resnet import ResNet
from clipsep_jax.families import get_family
from clipsep_jax.families.clipsep import losses
from clipsep_jax.models import forward

REPO = Path(__file__).resolve().parents[1]
CLIP_MEAN = torch.tensor(ImagePreprocessing().image_mean)[:, None, None]
CLIP_STD = torch.tensor(ImagePreprocessing().image_std)[:, None, None]


def torch_pixels(images):
    """uint8 [B, H, W, 3] -> CLIP-normalised [B, 3, H, W], as the reference feeds its frames."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - CLIP_MEAN) / CLIP_STD


def random_images(count, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# -- encoders -------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [16, 32, 8])
def test_resnet18_matches_torch_in_both_checkpoint_layouts(output_stride, tmp_path):
    net = save_tiny_resnet(tmp_path / "resnet18.pth", blocks=(2, 2, 2, 2),
                           widths=(64, 128, 256, 512))
    folder = tmp_path / "hub"  # the hub layout (timm/resnet18.tv_in1k): model.safetensors
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    images = random_images(3, 96)
    expected = tr.frame_vectors(net, torch_pixels(images), output_stride).numpy()
    for source in (tmp_path / "resnet18.pth", folder):
        resnet = ResNet.from_pretrained(str(source), output_stride=output_stride)
        assert resnet.config.blocks == (2, 2, 2, 2) and resnet.embedding_dim == 512
        got = resnet.encode_preprocessed(images)
        assert got.shape == (3, 512)
        assert relative_error(got, expected) <= 1e-4, (source, output_stride)


def test_resnet_reads_sizes_and_refuses_what_it_cannot_load(tmp_path, tiny_resnet_file):
    resnet = ResNet.from_pretrained(tiny_resnet_file)
    assert resnet.config.widths == TINY_RESNET["widths"] and resnet.embedding_dim == 128
    # Images of any size are resized and cropped as CLIP's are (224 px); one vector each.
    vectors = resnet.encode_image([random_images(1, 300)[0], random_images(1, 120)[0][:80]])
    assert vectors.shape == (2, 128) and np.all(np.isfinite(vectors))
    with pytest.raises(ValueError, match="images only"):
        resnet.encode_text(["tuba"])
    state = torch.load(tiny_resnet_file, weights_only=True)
    broken = dict(state)
    del broken["layer2.0.bn1.running_var"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*missing.*layer2_0/bn1/var|"
                                         r"missing\.pth.*batch_stats\.layer2_0\.bn1\.var"):
        ResNet.from_pretrained(str(tmp_path / "missing.pth"))
    torch.save({**state, "layer3.0.conv3.weight": torch.zeros(1)}, tmp_path / "deep.pth")
    with pytest.raises(ValueError, match="bottleneck"):
        ResNet.from_pretrained(str(tmp_path / "deep.pth"))
    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(16, 16, 5, 5)},
               tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*layer1\.0\.conv1\.weight"):
        ResNet.from_pretrained(str(tmp_path / "shape.pth"))


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_bert_matches_transformers(safe_serialization, tmp_path):
    model, tokenizer = save_tiny_bert(tmp_path / "bert", seed=3,
                                      safe_serialization=safe_serialization)
    texts = ["accordion", "the sound of a tuba", "acoustic guitar", "xylophone playing"]
    tokens = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens)
    hidden = out.last_hidden_state.numpy()
    mask = tokens["attention_mask"].numpy()[..., None].astype(np.float32)
    expected = {"mean": (hidden * mask).sum(1) / mask.sum(1), "cls": hidden[:, 0],
                "pooler": out.pooler_output.numpy()}
    for pooling, vectors in expected.items():
        bert = BERT.from_pretrained(str(tmp_path / "bert"), pooling=pooling)
        assert bert.embedding_dim == 32
        assert relative_error(bert.encode_text(texts), vectors) <= 1e-4, pooling
    ids, attention = bert.tokenize(texts)
    states, pooled = bert.model.apply({"params": bert.params}, ids, attention)
    valid = mask[..., 0] > 0  # transformers' states at padding positions are not compared
    assert relative_error(np.asarray(states)[valid], hidden[valid]) <= 1e-4
    assert relative_error(pooled, out.pooler_output.numpy()) <= 1e-4
    with pytest.raises(ValueError, match="text only"):
        bert.encode_image(random_images(1, 8))


def test_bert_without_a_pooler_loads_for_mean_and_cls_pooling(tmp_path):
    import transformers

    model, tokenizer = save_tiny_bert(tmp_path / "with")
    bare = transformers.BertModel(model.config, add_pooling_layer=False).eval()
    bare.load_state_dict(model.state_dict(), strict=False)
    bare.save_pretrained(tmp_path / "bare")
    tokenizer.save_pretrained(tmp_path / "bare")
    texts = ["tuba", "acoustic guitar"]
    for pooling in ("mean", "cls"):
        np.testing.assert_allclose(
            BERT.from_pretrained(str(tmp_path / "bare"), pooling=pooling).encode_text(texts),
            BERT.from_pretrained(str(tmp_path / "with"), pooling=pooling).encode_text(texts),
            atol=1e-6)
    with pytest.raises(ValueError, match=r"missing.*pooler"):
        BERT.from_pretrained(str(tmp_path / "bare"), pooling="pooler")


def test_bert_refuses_other_checkpoints(tmp_path, tiny_clip_folder):
    with pytest.raises(ValueError, match="not a BERT checkpoint"):
        BERT.from_pretrained(tiny_clip_folder)
    save_tiny_bert(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    from safetensors.torch import load_file
    state = load_file(str(weights))
    state.pop("encoder.layer.1.output.dense.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing.*layer_1\.output\.kernel"):
        BERT.from_pretrained(str(tmp_path / "bert"))


# -- the reference's models, converted ------------------------------------------------------

FULL_SIZE = dict(layers=7, ngf=64, channels=32)


def _spectrograms(batch, frames, seed=0):
    rng = np.random.default_rng(seed)
    sources = rng.gamma(0.5, 1.0, (batch, 2, 513, frames)).astype(np.float32) / 2
    mag_mix = np.abs(sources.sum(1) + rng.normal(0, 0.05, (batch, 513, frames)))
    return mag_mix.astype(np.float32), sources


def _reference_and_ours(net, kind, queries, tmp_path):
    """The reference rendition's loss and logits (evaluation mode) and ours from its checkpoint
    converted, on the same queries [B, 2, D]."""
    mag_mix, sources = _spectrograms(2, 256)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / f"{kind}.pt")
    config, variables = convert.load_reference_checkpoint(tmp_path / f"{kind}.pt", kind)
    net.eval()
    loss, out = net(torch.from_numpy(mag_mix)[:, None],
                    [torch.from_numpy(sources[:, i])[:, None] for i in range(2)],
                    [torch.from_numpy(queries[:, i]) for i in range(2)])
    ours = jax.jit(functools.partial(forward, config))(variables, mag_mix, queries, sources)
    expected = torch.cat(out["query_logits"], 1).detach().numpy()
    return config, (float(loss), expected), (float(ours["loss"]), ours["query_logits"])


def test_sop_checkpoint_gives_the_reference_logits_and_loss(tmp_path):
    resnet_net = save_tiny_resnet(tmp_path / "resnet18.pth", blocks=(2, 2, 2, 2),
                                  widths=(64, 128, 256, 512))
    frames = random_images(2 * 2 * 3, 64, seed=1)  # 2 mixtures x 2 sources x 3 frames
    # The reference: the frozen dilated ResNet's max-pooled vectors, averaged over the frames.
    expected_queries = tr.frame_vectors(resnet_net, torch_pixels(frames)).numpy()
    expected_queries = expected_queries.reshape(2, 2, 3, 512).mean(2)
    queries = ResNet.from_pretrained(str(tmp_path / "resnet18.pth")).encode_preprocessed(frames)
    queries = queries.reshape(2, 2, 3, 512).mean(2)
    assert relative_error(queries, expected_queries) <= 1e-4
    torch.manual_seed(0)
    config, (loss, logits), (our_loss, our_logits) = _reference_and_ours(
        tr.CLIPSep(**FULL_SIZE), "sop", queries, tmp_path)
    assert config.model.kind == "sop" and config.query.encoder == "resnet"
    assert relative_error(our_logits, logits) <= 1e-4
    assert abs(our_loss - loss) <= 1e-4 * abs(loss)


def test_bertsep_checkpoint_gives_the_reference_logits_and_loss(tmp_path):
    model, tokenizer = save_tiny_bert(tmp_path / "bert", hidden_size=256, num_hidden_layers=1)
    labels = [["accordion", "tuba"], ["acoustic guitar", "violin"]]
    bert = BERT.from_pretrained(str(tmp_path / "bert"))
    queries = bert.encode_text([x for pair in labels for x in pair]).reshape(2, 2, 256)
    torch.manual_seed(0)
    config, (loss, logits), (our_loss, our_logits) = _reference_and_ours(
        tr.CLIPSep(query_dim=256, **FULL_SIZE), "bertsep", queries, tmp_path)
    assert config.model.kind == "bertsep" and config.model.query_dim == 256
    assert relative_error(our_logits, logits) <= 1e-4
    assert abs(our_loss - loss) <= 1e-4 * abs(loss)


# -- drop_closest ---------------------------------------------------------------------------


def brute_force_similarity(queries):
    out = []
    for example in queries.astype(np.float64):
        best = -np.inf
        for i in range(len(example)):
            for j in range(len(example)):
                if i != j:
                    a, b = example[i], example[j]
                    best = max(best, a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        out.append(best)
    return np.array(out)


@pytest.mark.parametrize("num_sources", [2, 3])
def test_drop_closest_against_brute_force(num_sources):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(10, num_sources, 16)).astype(np.float32)
    queries[3, 1] = 2 * queries[3, 0]  # identical directions: similarity 1
    queries[7, 1] = -queries[7, 0]  # opposite: -1 (unless a third query is closer)
    similarity = np.asarray(losses.query_similarity(jnp.asarray(queries)))
    expected = brute_force_similarity(queries)
    np.testing.assert_allclose(similarity, expected, atol=1e-6)
    # Hard: the 7 least alike of 10, the 3 most alike dropped; inactive: the first 7.
    keep = np.asarray(losses.rows_to_keep(jnp.asarray(similarity), 7, True))
    assert sorted(keep) == sorted(np.argsort(expected)[:7].tolist())
    assert 3 not in keep and len(set(keep.tolist())) == 7
    np.testing.assert_array_equal(losses.rows_to_keep(jnp.asarray(similarity), 7, False),
                                  np.arange(7))
    weights = np.asarray(losses.soft_drop_weight(jnp.asarray(similarity)))
    expected_weights = [1.0 if s <= 0.5 else max(0.0, 1 - 2 * (s - 0.5)) for s in expected]
    np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
    assert weights[3] == pytest.approx(0.0, abs=1e-6)


def test_drop_closest_stays_on_each_device():
    """With one group per device, the kept rows stay split over the devices as the batch was,
    and each device keeps the least alike of its own rows."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(24, 2, 8)).astype(np.float32)  # 3 rows per device, 2 kept
    spectra = rng.normal(size=(24, 5, 4)).astype(np.float32)
    similarity = losses.query_similarity(jnp.asarray(queries))

    @jax.jit
    def select(spectra, similarity):
        return losses.drop_closest_rows((spectra,), similarity, 16, True, groups=8)[0]

    kept = select(jax.device_put(spectra, rows), jax.device_put(similarity, rows))
    assert kept.shape == (16, 5, 4)
    assert {s.data.shape for s in kept.addressable_shards} == {(2, 5, 4)}
    expected = np.concatenate([
        spectra[3 * g:3 * g + 3][np.argsort(np.asarray(similarity)[3 * g:3 * g + 3])[:2]]
        for g in range(8)])
    np.testing.assert_array_equal(np.asarray(kept), expected)


def test_drop_closest_in_the_training_loss():
    config = default_config()
    config.model.num_downs, config.model.base_width, config.model.num_mask_channels = 5, 8, 4
    config.model.query_dim = 8
    config.train.batch_size = 4
    config.clipsep.drop_closest, config.clipsep.drop_closest_steps = 2, 100
    family = get_family(config)
    assert family.rows_per_step(config) == 6
    variables = family.init_variables(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    mag_mix, mags = rng.gamma(0.5, 1.0, (6, 513, 32)), rng.gamma(0.5, 1.0, (6, 2, 513, 32))
    mag_mix = (mag_mix + mags.sum(1)).astype(np.float32)
    queries = rng.normal(size=(6, 2, 8)).astype(np.float32)
    queries[[1, 4], 1] = queries[[1, 4], 0] * 3  # rows 1 and 4 are the alike pairs
    batch = {"mag_mix": mag_mix, "mags": mags.astype(np.float32), "queries": queries}
    state = {"batch_stats": variables["batch_stats"]}

    def loss(step, rows=None, weight=None):
        if rows is None:
            out, _ = family.loss(config, variables["params"], state, batch, None, jnp.int32(step))
            return float(out)
        return float(forward(config, variables, mag_mix[rows], queries[rows], batch["mags"][rows],
                             train=True, example_weight=weight)["loss"])

    assert loss(99) == pytest.approx(loss(None, [0, 1, 2, 3]), rel=1e-6)
    assert loss(100) == pytest.approx(loss(None, [0, 2, 3, 5]), rel=1e-6)
    config.clipsep.drop_closest = -1  # soft: all rows, the alike ones weighted 0
    weight = np.ones(6, np.float32)
    weight[[1, 4]] = 0.0
    assert loss(100) == pytest.approx(loss(None, list(range(6)), weight), rel=1e-5)
    assert loss(99) == pytest.approx(loss(None, list(range(6))), rel=1e-6)


def test_drop_closest_settings_are_checked_and_old_configs_migrate():
    from clipsep_jax.config import validate

    config = default_config("pit")
    config.clipsep.drop_closest = 4
    with pytest.raises(ValueError, match="config.clipsep.drop_closest=4: model kind 'pit'"):
        validate(config)
    config = default_config()
    config.clipsep.drop_closest = -3
    with pytest.raises(ValueError, match="config.clipsep.drop_closest=-3"):
        validate(config)
    old = json.loads(default_config().to_json_best_effort())
    old["train"].update(drop_closest=3, drop_closest_steps=50)
    del old["clipsep"]["drop_closest"], old["clipsep"]["drop_closest_steps"]
    migrated = from_dict(old, "config.json")
    assert (migrated.clipsep.drop_closest, migrated.clipsep.drop_closest_steps) == (3, 50)


def test_baseline_kinds_name_their_encoders():
    from clipsep_jax.config import validate

    sop, bertsep = default_config("sop"), default_config("bertsep")
    assert (sop.query.encoder, sop.query.encoder_model, sop.model.query_dim) == (
        "resnet", "timm/resnet18.tv_in1k", 512)
    assert (bertsep.query.encoder, bertsep.query.mode, bertsep.model.query_dim) == (
        "bert", "text", 256)
    sop.query.mode = "text"
    with pytest.raises(ValueError, match="config.query.mode='text': model kind 'sop'"):
        validate(sop)
    bertsep.query.encoder = "clip"
    with pytest.raises(ValueError, match="config.query.encoder='clip': model kind 'bertsep'"):
        validate(bertsep)


# -- tiny runs on generated data ------------------------------------------------------------


@pytest.fixture(scope="module", params=["sop", "bertsep"])
def trained_baseline(request, tmp_path_factory, generated_dataset, tiny_resnet_file,
                     tiny_bert_folder):
    kind = request.param
    config = tiny_config(generated_dataset, kind, num_steps=250, checkpoint_every_steps=250,
                         validation_every_steps=250, learning_rate=3e-3)
    config.query.encoder_model = tiny_resnet_file if kind == "sop" else tiny_bert_folder
    if kind == "sop":  # drop_closest on: 8 + 8 rows per step, the 8 least alike trained on
        config.clipsep.drop_closest, config.clipsep.drop_closest_steps = 8, 100
    workdir = tmp_path_factory.mktemp(f"trained_{kind}")
    checkpoints.write_config(str(workdir), config)
    train.train_and_evaluate(config, str(workdir))
    return kind, str(workdir)


def test_tiny_baseline_learns_and_evaluate_prints_its_row(trained_baseline):
    kind, workdir = trained_baseline
    row_name = {"sop": "image (ResNet-18)", "bertsep": "label (BERT)"}[kind]
    result = subprocess.run(
        [sys.executable, "-m", "clipsep_jax.evaluate", f"--workdir={workdir}",
         f"--config={REPO / 'configs/from_workdir.py'}:{workdir}",
         "--config.eval.num_workers=0"],
        capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"| {row_name} | - |" in result.stdout, result.stdout
    print(result.stdout)
    report = json.loads((Path(workdir) / "evaluation" / "test_2src_step250.json").read_text())
    rows = {r["query"]: r for r in report["rows"]}
    mode = {"sop": "image", "bertsep": "text"}[kind]
    assert set(rows) == {"mixture", mode}
    assert rows[mode]["sdr"]["mean"] > rows["mixture"]["sdr"]["mean"] + 3, rows


def test_tiny_baseline_separates_with_its_encoder(trained_baseline):
    from clipsep_jax.families.clipsep.separator import Separator
    from clipsep_jax.separation import SeparationError

    kind, workdir = trained_baseline
    separator = Separator.from_checkpoint(workdir)
    mixture = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    if kind == "sop":
        query, wrong = random_images(1, 64)[0], "tuba"
    else:
        query, wrong = "tuba", random_images(1, 64)[0]
    estimate, residual = separator.separate_in_order(mixture, 16000, [query])
    assert estimate.shape == residual.shape == mixture.shape
    with pytest.raises(SeparationError, match=f"model kind '{kind}'"):
        separator.check_queries([wrong])
    config = checkpoints.load_config(workdir)
    assert load_query_encoder(config.query).embedding_dim == config.model.query_dim
