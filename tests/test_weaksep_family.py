"""The weaksep family end to end: examples without clean sources, training through the generic
loop with a frozen CLAP loaded from a transformers folder, evaluation, text-queried separation,
the reference checkpoint's conversion, and captioned (AudioCaps) examples."""

import json

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
from media_trees import SR, tone
from test_clap import save_tiny_clap
from test_data_prep import write_audiocaps_csv
from test_weaksep_unet import EMBEDDING_DIM, SMALL, reference_state_dict, torch_net

from clipsep_jax import checkpoints, convert, export, inference, train
from clipsep_jax.config import default_config, load_config_file, validate
from clipsep_jax.errors import UserError
from clipsep_jax.families import get_family
from clipsep_jax.families.weaksep import load_frozen_clap
from clipsep_jax.families.weaksep.data import Clips, Prompts, TrainingExamples
from clipsep_jax.input_pipeline import open_split
from data_prep import build


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weaksep_clap")
    save_tiny_clap(folder)
    return str(folder)


def tiny_weaksep(data_dir: str, clap: str, **weaksep):
    """2 labels in the generated dataset: constituents of one clip each (P = 1)."""
    config = default_config("weaksep")
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    a = config.audio
    a.n_fft, a.win_length, a.hop_length, a.crop_samples = 126, 126, 64, 4032  # 64 x 64
    m = config.model
    m.num_downs, m.base_width, m.out_channels = 4, 8, 6
    m.attention_levels, m.num_heads = (2, 3), 2
    m.cond_dim, m.embedding_dim = 32, 24  # the tiny CLAP's
    w = config.weaksep
    w.clap = clap
    w.clauses_per_mixture = 1
    w.data.min_sources_per_mixture = 1
    for key, value in weaksep.items():
        setattr(w, key, value)
    t = config.train
    t.batch_size, t.num_steps, t.learning_rate = 8, 3, 1e-3
    t.log_every_steps, t.checkpoint_every_steps, t.validation_every_steps = 1, 3, 3
    config.eval.batch_size = 8
    config.eval.num_workers = 0
    config.eval.num_examples = 4
    return config


def test_weak_examples_hold_mixtures_and_prompts_but_no_clean_source(generated_dataset,
                                                                     clap_folder):
    config = tiny_weaksep(generated_dataset, clap_folder)
    clap = load_frozen_clap(config)
    source, _ = open_split(config.data, "train")
    examples = TrainingExamples(config, Clips(config, source, "train"),
                                Prompts(clap.tokenizer, clap.text_length), None)
    example = examples(0, np.random.default_rng(0))
    assert set(example) == {"constituents", "target_scale", "mixture_ids", "mixture_mask",
                            "clause_ids", "clause_mask", "clause_weights", "clause_valid",
                            "clause_keys"}  # no single source
    assert example["constituents"].shape == (2, 4032)
    decode = clap.tokenizer.decode
    mixtures = {decode(i[m > 0], skip_special_tokens=True)
                for i, m in zip(example["mixture_ids"], example["mixture_mask"], strict=True)}
    assert mixtures == {"The sound mixture of accordion", "The sound mixture of tuba"}
    clause = decode(example["clause_ids"][0, 0][example["clause_mask"][0, 0] > 0],
                    skip_special_tokens=True)
    assert clause in ("The sound of accordion", "The sound of tuba")
    np.testing.assert_array_equal(example["target_scale"], [1.0, 1.0])  # p_n = 1

    config.weaksep.mode = "semi_supervised"
    with pytest.raises(UserError, match="needs single-source clips"):
        TrainingExamples(config, examples.clips, examples.prompts, None)


def test_trains_with_a_frozen_clap_evaluates_and_separates(generated_dataset, clap_folder,
                                                           tmp_path):
    config = tiny_weaksep(generated_dataset, clap_folder)
    validate(config)
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 3 and "frozen" not in state.model_state
    log = [json.loads(line)
           for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert {"url", "crl", "cnt", "loss"} <= set(log[0])
    assert np.isfinite(log[-1]["validation_sdr"]) and np.isfinite(log[-1]["validation_loss"])
    # CLAP stays out of the checkpoint: only the separator's variables are saved.
    loaded_config, variables = inference.load_for_inference(workdir)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"unet", "query_head"}

    family = get_family(loaded_config)
    report = family.evaluate(loaded_config, variables, None, progress=False)
    assert [row["query"] for row in report["rows"]] == ["mixture", "text"]
    assert report["rows"][0]["sdr"]["count"] == 4
    assert "| text |" in family.format_table(report)
    written = family.write_examples(loaded_config, variables, tmp_path / "examples", 1)
    assert {p.name for p in written[0].iterdir()} >= {"mixture.wav", "estimate_0.wav",
                                                      "mask_1.png", "prompts.txt"}

    # Packaged, the model carries its CLAP (clap/) and separates alike from any place.
    package = export.export(workdir, tmp_path / "package")
    assert (package / "clap" / "config.json").is_file()
    assert json.loads((package / "config.json").read_text())["weaksep"]["clap"] == "clap"
    card = (package / "README.md").read_text()
    assert "`weaksep.clap`: `clap` (bundled in this folder)" in card
    # the card's use: exactly what the lines below do
    assert "separator = get_family(config).separator(config, variables)" in card
    moved = tmp_path / "moved"
    package.rename(moved)
    packaged_config, packaged = inference.load_for_inference(moved)
    assert packaged_config.weaksep.clap == str(moved / "clap")

    separator = family.separator(loaded_config, variables)
    recording = np.random.default_rng(0).normal(0, 0.1, 12000).astype(np.float32)
    np.testing.assert_allclose(
        family.separator(packaged_config, packaged).separate_in_order(
            recording, 16000, ["The sound of tuba"])[0],
        separator.separate_in_order(recording, 16000, ["The sound of tuba"])[0], atol=1e-6)
    outputs = separator.separate(recording, 16000, ["The sound of tuba", "The sound of violin"])
    assert list(outputs) == ["The sound of tuba", "The sound of violin", "residual"]
    assert all(o.shape == recording.shape for o in outputs.values())
    # One query: estimate + residual is the recording (its masks are at most 1); a stereo
    # recording at another rate comes back like it, in windows or in one pass.
    estimate, residual = separator.separate_in_order(recording, 16000, ["The sound of tuba"])
    np.testing.assert_allclose(estimate + residual, recording, atol=1e-5)
    stereo = np.stack([recording, recording[::-1]], axis=1)
    fractions = []
    windowed = separator.separate_in_order(stereo, 22050, ["The sound of tuba"],
                                           progress=fractions.append)
    whole = separator.separate_in_order(stereo, 22050, ["The sound of tuba"], one_pass=True)
    assert [o.shape for o in windowed] == [stereo.shape] * 2 and fractions[-1] == 1.0
    assert [o.shape for o in whole] == [stereo.shape] * 2
    with pytest.raises(Exception, match="text queries only"):
        separator.check_queries([np.zeros((4, 4, 3), np.uint8)])


def test_semi_supervised_loss_has_both_terms(generated_dataset, clap_folder):
    config = tiny_weaksep(generated_dataset, clap_folder, mode="semi_supervised")
    config.weaksep.loss.terms = "url"  # CNT's path is trained in the test above
    family = get_family(config)
    source, metadata = open_split(config.data, "train")
    transform = family.training_transform(config, source, metadata)
    rng = np.random.default_rng(0)
    examples = [transform(i, rng) for i in range(2)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    assert batch["sources"].shape == (2, 2, 4032)  # the supervised term's single sources
    variables = family.init_variables(config, jax.random.key(0))
    state = {"batch_stats": variables["batch_stats"],
             "frozen": family.frozen_variables(config)}

    config.weaksep.loss.supervised_weight = 2.0  # one compilation: each weight is another
    config.weaksep.loss.unsupervised_weight = 0.5
    total, (metrics, new_state) = jax.jit(lambda p, s, b: family.loss(config, p, s, b, None, 0))(
        variables["params"], state, batch)
    assert {"supervised_url", "weak_loss", "url"} <= set(metrics)
    assert "crl" not in metrics and "cnt" not in metrics and "frozen" not in new_state
    assert metrics["supervised_url"] > 0 and metrics["weak_loss"] > 0
    np.testing.assert_allclose(total, 2 * metrics["supervised_url"] + 0.5 * metrics["weak_loss"],
                               rtol=1e-5)


def test_wrong_clap_sizes_and_terms_are_named(generated_dataset, clap_folder):
    config = tiny_weaksep(generated_dataset, clap_folder)
    config.model.cond_dim = 64
    with pytest.raises(UserError, match="config.model.cond_dim=64.*32-wide"):
        load_frozen_clap(config)
    config = tiny_weaksep(generated_dataset, clap_folder)
    config.weaksep.loss.terms = "url,sdr"
    with pytest.raises(UserError, match="config.weaksep.loss.terms"):
        validate(config)


def test_reference_checkpoint_converts_with_its_sizes(tmp_path):
    net = torch_net()
    torch.save({"epoch": 3, "state_dict": reference_state_dict(net), "best_sdr": 1.0},
               tmp_path / "model_best.pth.tar")
    config, variables = convert.load_reference_checkpoint(tmp_path / "model_best.pth.tar",
                                                          "weaksep")
    assert config.model.num_downs == SMALL["num_downs"]
    assert config.model.embedding_dim == EMBEDDING_DIM
    assert set(variables["params"]) == {"unet", "query_head"}
    np.testing.assert_allclose(
        variables["params"]["query_head"]["query_projection"]["dense"]["kernel"],
        net.net_clap.fc.weight.detach().numpy().T)
    state = reference_state_dict(net)
    state["module.net_sound.unet_block.typo.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(UserError, match="bad.pth.tar.*unexpected.*typo"):
        convert.load_reference_checkpoint(tmp_path / "bad.pth.tar", "weaksep")


def test_captioned_clips_give_clause_prompts(tmp_path, clap_folder):
    root = tmp_path / "in"
    (root / "audio").mkdir(parents=True)
    captions = {"car": "A car passes by", "bell": "An engine hums then a horn honks",
                "dog": "A dog barks and a man speaks"}
    for i, name in enumerate(captions):
        sf.write(root / "audio" / f"{name}.wav", tone(1.5, SR, 200 + 100 * i, seed=i), SR)
    for offset, split in enumerate(("train", "val", "test")):  # audiocap ids are unique
        write_audiocaps_csv(root / f"{split}.csv", [
            [10 * offset + i, name, 0, caption] for i, (name, caption) in enumerate(
                captions.items())])
    build.run(["--dataset=audiocaps", f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}",
               "--num_workers=1"])
    config = tiny_weaksep(str(tmp_path / "out"), clap_folder, clauses_per_mixture=3)
    config.data.name = "audiocaps"
    clap = load_frozen_clap(config)
    source, _ = open_split(config.data, "train")
    clips = Clips(config, source, "train")
    assert clips.captioned
    example = TrainingExamples(config, clips, Prompts(clap.tokenizer, clap.text_length),
                               None)(1, np.random.default_rng(1))
    decode = clap.tokenizer.decode
    caption = decode(example["mixture_ids"][0][example["mixture_mask"][0] > 0],
                     skip_special_tokens=True)
    assert caption == "An engine hums then a horn honks"
    clauses = [decode(i[m > 0], skip_special_tokens=True)
               for i, m in zip(example["clause_ids"][0], example["clause_mask"][0], strict=True)]
    assert set(clauses) == {"An engine hums", "A horn honks"}
    # two clauses for P = 3: one duplicated, each copy weighing 1 / 2 (the reference's rule)
    assert sorted(example["clause_weights"][0].tolist()) == [0.5, 0.5, 1.0]
    assert example["target_scale"].tolist() == [1.0, 1.0]


def test_demo_config_validates():
    for spec in ("configs/weak_demo.py", "configs/weak_demo.py:clap"):
        validate(load_config_file(spec))
    assert jax.device_count() == 8  # the family tests above ran sharded on 8 devices
    assert checkpoints.CONFIG_FILE == "config.json"
