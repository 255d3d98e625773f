"""The jobs behind ``python -m clipsep_jax.main`` (and commands built on it, such as the weaksep
loss ablation): preparing a dataset that needs no input, the prerequisite runs a config names,
training with the evaluation after it."""

from __future__ import annotations

import jax
import ml_collections
from jax.experimental import multihost_utils

from clipsep_jax import config as config_lib
from clipsep_jax import evaluate, train

__all__ = ["run_prerequisites", "train_and_report"]


def _prepare_dataset(config) -> None:
    """Builds a dataset that needs no input (``config.data.prepare_if_missing``); on several hosts
    the first builds it and the others then read it."""
    # data_prep is the offline job's package; only this option needs it at training time.
    from data_prep import synth_music

    if jax.process_count() == 1:
        synth_music.prepare_for_config(config)
        return
    if jax.process_index() == 0:
        synth_music.prepare_for_config(config)
    multihost_utils.sync_global_devices("dataset prepared")
    if jax.process_index() != 0:
        synth_music.prepare_for_config(config)


def _evaluation_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The configs of the evaluations after training: ``config`` itself, then one per split of
    ``config.eval.extra_splits`` (that split's clips queried and interfering)."""
    configs = [config]
    for split in (s.strip() for s in config.eval.extra_splits.split(",")):
        if split:
            extra = ml_collections.ConfigDict(config.to_dict())
            extra.eval.split, extra.eval.interference_split = split, ""
            configs.append(extra)
    return configs


def run_prerequisites(config: ml_collections.ConfigDict) -> None:
    """Trains (or finds trained) the runs of ``config.prerequisites``, in order."""
    for spec, prerequisite, prerequisite_workdir in config_lib.prerequisite_runs(config):
        print(f"prerequisite {spec} in {prerequisite_workdir}", flush=True)
        config_lib.validate(prerequisite)
        train_and_report(prerequisite, prerequisite_workdir)
        print(f"prerequisite {spec} done", flush=True)


def train_and_report(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Prepares the dataset if asked, trains (resuming; a finished run only loads), then
    evaluates when ``config.eval.after_training``, printing the tables. Returns the reports."""
    if config.data.prepare_if_missing:
        _prepare_dataset(config)
    train.train_and_evaluate(config, workdir)
    reports = []
    if config.eval.after_training:
        for split_config in _evaluation_configs(config):
            report, path = evaluate.run(split_config, workdir, "best")
            reports.append(report)
            if jax.process_index() == 0:
                print("\n" + evaluate.format_table(report), flush=True)
                print(f"evaluation: {path.with_suffix('.md')} and {path.name}", flush=True)
                for folder in report.get("audio_examples", []):
                    print(f"example: {folder}/", flush=True)
    return reports
