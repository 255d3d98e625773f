"""Everything on disk that holds a model, in one place: training workdirs and model directories.

A training workdir::

    WORKDIR/config.json            the run's config (clipsep_jax.config schema)
    WORKDIR/checkpoints/<step>/    orbax checkpoints with two items:
        state/                     the train state (step, params, model_state, opt_state, rng,
                                   ema_params); runs before the model-family redesign saved
                                   batch_stats in place of model_state, and no rng / ema_params
        data/                      the input pipeline's grain iterator state
    the best checkpoint by the metric BEST_METRIC (validation loss) is kept beside the last
    ``keep`` ones.

A model directory (:func:`save_model`, ``python -m clipsep_jax.convert``)::

    DIR/config.json   the config
    DIR/variables/    orbax checkpoint of the variables {'params', <state collections>}

A pretrained folder (:func:`save_pretrained`, ``python -m clipsep_jax.export``), the layout
Hugging Face users expect, loadable by folder or hub id (:func:`load_pretrained`)::

    DIR/config.json         the config
    DIR/model.safetensors   the variables, keys ``params/unet/down_conv_0/kernel``, ...
    DIR/README.md           the model card (what it is, the models it uses, data, evaluation,
                            config)
    DIR/query_encoder/      the models it uses beside its weights, when not on the hub (else
                            their hub ids): the query encoder, or the family's own
                            (``Family.companions``: weaksep's frozen CLAP in DIR/clap/)

All are written under temporary names and renamed when complete, so a reader never sees half
of one. :class:`TrainingCheckpoints` saves and restores for training; :func:`load_workdir` and
:func:`load_model` restore variables for inference (``clipsep_jax.inference`` picks between them
and reference checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from clipsep_jax import config as config_lib
from clipsep_jax.errors import UserError
from clipsep_jax.families import get_family
from clipsep_jax.families.base import Family
from clipsep_jax.files import staging_folder, write_text_atomic

__all__ = [
    "CONFIG_FILE",
    "VARIABLES_DIR",
    "CHECKPOINTS_DIR",
    "BEST_METRIC",
    "CheckpointError",
    "write_config",
    "load_config",
    "save_model",
    "load_model",
    "TrainingCheckpoints",
    "load_workdir",
    "WEIGHTS_FILE",
    "is_pretrained_folder",
    "looks_like_hub_id",
    "save_pretrained",
    "load_pretrained",
    "push_to_hub",
    "model_card",
]

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM = "state", "data"
BEST_METRIC = "validation_loss"  # lower is better


class CheckpointError(UserError):
    """A path that holds no usable checkpoint; the message names it and says why."""


def write_config(directory: str | Path, config: ml_collections.ConfigDict) -> Path:
    """Writes ``directory/config.json`` atomically (a temporary name, then a rename)."""
    return write_text_atomic(Path(directory) / CONFIG_FILE,
                             config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(directory: str | Path) -> ml_collections.ConfigDict:
    """The config saved in a model directory or workdir, merged over today's defaults (new fields
    filled; older layouts migrated by :func:`clipsep_jax.config.migrate`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {directory} a clipsep-jax model directory "
                                "or training workdir?")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return config_lib.from_dict(saved, str(path))


def save_model(directory: str | Path, config: ml_collections.ConfigDict, variables: dict) -> Path:
    """Writes ``config`` and ``variables`` to a new directory (refused if it exists)."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory}: already exists; choose a new output directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(directory)
    try:
        write_config(staging, config)
        host_variables = jax.tree_util.tree_map(np.asarray, variables)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / VARIABLES_DIR, host_variables)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_model(directory: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """Reads a model directory written by :func:`save_model` -> (config, variables as numpy)."""
    directory = Path(directory).absolute()
    config = load_config(directory)
    variables_path = directory / VARIABLES_DIR
    if not variables_path.is_dir():
        raise FileNotFoundError(f"{variables_path}: no variables checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(variables_path)
    return config, variables


def _saved_state_keys(directory: Path, step: int) -> set[str]:
    """Top-level fields of the train state saved at ``step`` under ``directory`` (read from the
    item's own metadata: a manager without restore arguments does not know the item's type)."""
    path = Path(directory) / str(step) / STATE_ITEM
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(path)
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(f"{path}: no readable train state ({error})") from error
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not hasattr(tree, "keys"):
        raise CheckpointError(f"{path}: cannot read the train state's layout")
    return set(tree.keys())


class TrainingCheckpoints:
    """The checkpoints of a training workdir: saving every item, restoring for training.

    Keeps the last ``keep`` checkpoints and the one with the lowest :data:`BEST_METRIC`; saves
    asynchronously (:meth:`wait` before reading them)."""

    def __init__(self, workdir: str | Path, keep: int):
        policies = ocp.checkpoint_managers
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        # best_fn as well: without it orbax 0.12 drops the metrics it is given (the metadata
        # says {}), and "best" found nothing
        options = ocp.CheckpointManagerOptions(preservation_policy=preservation,
                                               best_fn=lambda m: m[BEST_METRIC],
                                               best_mode="min",
                                               enable_async_checkpointing=True, create=True)
        self.directory = Path(workdir).absolute() / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(str(self.directory), options=options,
                                             item_names=(STATE_ITEM, DATA_ITEM))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any,
             metrics: dict[str, float] | None = None) -> None:
        """Saves ``state`` and the grain iterator's position; ``metrics`` may hold
        :data:`BEST_METRIC` (finite values only are kept)."""
        if metrics is not None and not np.isfinite(metrics.get(BEST_METRIC, np.nan)):
            metrics = None
        self.manager.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator)}),
            metrics=metrics, force=True)

    def restore(self, step: int, fresh_state: Any, data_iterator: Any) -> Any:
        """The train state of ``step``, in the shapes and shardings of ``fresh_state`` (a newly
        created train state); ``data_iterator`` is set to the saved position.

        A checkpoint of the layout before the model-family redesign (``batch_stats`` beside
        ``params``, no rng key or EMA) is read into today's state: ``model_state =
        {"batch_stats": ...}``, the rng key and EMA parameters kept from ``fresh_state``."""
        keys = _saved_state_keys(self.directory, step)
        data = grain.checkpoint.CheckpointRestore(data_iterator)
        if "model_state" in keys:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(_abstract(fresh_state)),
                DATA_ITEM: data}))
            return restored[STATE_ITEM]
        legacy = {"step": fresh_state.step, "params": fresh_state.params,
                  "batch_stats": fresh_state.model_state["batch_stats"],
                  "opt_state": fresh_state.opt_state}
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(_abstract(legacy)), DATA_ITEM: data}))
        old = restored[STATE_ITEM]
        return fresh_state.replace(step=old["step"], params=old["params"],
                                   model_state={"batch_stats": old["batch_stats"]},
                                   opt_state=old["opt_state"])

    def restore_newest_intact(self, fresh_state: Any, data_iterator: Any) -> Any:
        """:meth:`restore` of the newest checkpoint that reads back. An unreadable newer one is
        reported and moved aside to ``<step>.unreadable`` (kept for inspection; the run will
        write that step again). CheckpointError if none reads."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            reason = None
            try:
                state = self.restore(step, fresh_state, data_iterator)
            except Exception as error:  # orbax and tensorstore raise many kinds
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            if not _all_hosts_agree(reason is None):  # every host resumes from the same step
                failures.append((step, reason or "unreadable on another host"))
                continue
            for bad, reason in failures:
                aside = self.directory / f"{bad}.unreadable"
                suffix = 1
                while aside.exists():
                    aside, suffix = self.directory / f"{bad}.unreadable.{suffix}", suffix + 1
                if jax.process_index() == 0:
                    (self.directory / str(bad)).rename(aside)
                print(f"warning: checkpoint {bad} cannot be read ({reason}); moved to {aside}; "
                      f"resuming from checkpoint {step}", flush=True)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("checkpoint chosen")
            if failures:
                self.manager.reload()
            return state
        raise CheckpointError(
            f"{self.directory}: no checkpoint can be read ("
            + "; ".join(f"step {s}: {r}" for s, r in failures)
            + "); move the folder away to start again")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _all_hosts_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every host (a collective: every host must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array | jax.ShapeDtypeStruct) else x, tree)


def _choose_step(manager: ocp.CheckpointManager, workdir: Path, step: int | str) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"{workdir}: no finished checkpoint in {CHECKPOINTS_DIR}/")
    if step == "latest":
        return steps[-1]
    if step == "best":
        values = {}
        for s in steps:
            metrics = manager.metrics(s) or {}
            if BEST_METRIC in metrics:
                values[s] = float(metrics[BEST_METRIC])
        return min(values, key=lambda s: (values[s], -s)) if values else steps[-1]
    chosen = int(step)
    if chosen not in steps:
        raise CheckpointError(f"{workdir}: no checkpoint at step {chosen} (there are {steps})")
    return chosen


def load_workdir(
    workdir: str | Path, step: int | str = "latest"
) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, variables, step) of a training workdir's checkpoint ``step``: ``"latest"``,
    ``"best"`` (lowest validation loss; the latest when no checkpoint has one, as the reference's
    best_model.pt) or a step number. The variables are the EMA parameters when the run kept
    them, with the model state beside them, on this process's first device."""
    workdir = Path(workdir).absolute()
    config = load_config(workdir)
    manager = ocp.CheckpointManager(
        str(workdir / CHECKPOINTS_DIR), item_names=(STATE_ITEM, DATA_ITEM),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        chosen = _choose_step(manager, workdir, step)
        candidates = [chosen]
        if step == "latest":  # an unreadable newest checkpoint: the newest one that reads
            candidates += sorted((s for s in manager.all_steps() if s < chosen), reverse=True)
        first_error = None
        for chosen in candidates:
            restored, error = None, None
            try:
                restored = _restore_variables(manager, workdir, config, chosen)
            except Exception as e:  # orbax and tensorstore raise many kinds
                error = e
            if _all_hosts_agree(error is None):
                break
            first_error = first_error or (chosen, error)
            print(f"warning: {workdir}: checkpoint {chosen} cannot be read; trying the one "
                  "before", flush=True)
        else:
            step_failed, error = first_error
            reason = str(error).splitlines()[0][:200] if error else "unreadable on another host"
            raise CheckpointError(f"{workdir}: checkpoint {step_failed} cannot be read "
                                  f"({reason}), nor any one before it")
    finally:
        manager.close()
    return config, _as_variables(restored, workdir, chosen), chosen


def _restore_variables(manager: ocp.CheckpointManager, workdir: Path,
                       config: ml_collections.ConfigDict, chosen: int) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: get_family(config).init_variables(
            config, jax.random.PRNGKey(0))))
    params = shapes.pop("params")
    keys = _saved_state_keys(workdir / CHECKPOINTS_DIR, chosen)
    if "model_state" in keys:
        use_ema = "ema_params" in keys and config.train.ema_decay > 0
        item = {"ema_params" if use_ema else "params": params, "model_state": shapes}
    else:
        item = {"params": params, **shapes}
    return manager.restore(chosen, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)}))[STATE_ITEM]


def _as_variables(restored: dict, workdir: Path, chosen: int) -> dict:
    missing = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(restored)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise CheckpointError(f"{workdir}: checkpoint {chosen} lacks {', '.join(missing[:5])} "
                              f"(of {len(missing)} missing); is it of this model's config?")
    if "model_state" in restored:
        variables = {"params": restored.get("ema_params", restored.get("params")),
                     **restored["model_state"]}
    else:
        variables = dict(restored)
    return variables


# ---------------------------------------------------------------------------------------------
# Pretrained folders: the layout Hugging Face users expect (from_pretrained / save_pretrained)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
ENCODER_DIR = "query_encoder"  # a query encoder that is not on the hub travels with the model
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_pretrained`."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path: a Hugging Face model repository id. A name
    whose first part is a local folder (``runs/dem``, a typo of ``runs/demo``) is a path."""
    return (bool(_HUB_ID.match(name)) and not Path(name).exists()
            and not Path(name).parent.is_dir())


def _flat_variables(variables: dict) -> dict[str, np.ndarray]:
    # ascontiguousarray makes a 0-d array 1-d: the reshape keeps scalars (logit scales) scalars
    return {"/".join(str(getattr(k, "key", k)) for k in path):
            np.ascontiguousarray(leaf).reshape(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32)
                                       if np.asarray(x).dtype.kind == "f" else np.asarray(x),
                                       variables))}


def save_pretrained(folder: str | Path, config: ml_collections.ConfigDict, variables: dict, *,
                    step: int | None = None, evaluation: str | None = None,
                    dataset: dict | None = None, overwrite: bool = False) -> Path:
    """Writes a pretrained folder: ``config.json``, the variables as ``model.safetensors`` (keys
    ``params/unet/down_conv_0/kernel``, ...), the model card ``README.md`` (:func:`model_card`
    with the training ``step``, the ``evaluation`` table and ``dataset`` facts, where known)
    and, for each model this one uses that is a local folder or file rather than a hub id (the
    family's ``companions``: the query encoder, weaksep's CLAP), a copy of it in its folder
    (``query_encoder/``, ``clap/``; the config then names it relatively).

    Everything is written into a temporary folder first. An existing ``folder`` is refused
    unless ``overwrite``; then only these items are replaced (each new one renamed in before
    the old one is removed) and everything else in it (a git clone's files, say) is kept."""
    from safetensors.numpy import save_file

    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: is a file, not a folder")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: already exists; choose a new output folder, or "
                              "overwrite (--overwrite) to replace the model files in it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(folder)
    try:
        config = ml_collections.ConfigDict(config.to_dict())
        family = get_family(config)
        companions = family.companions(config)
        for field, name in companions.items():
            value = str(_field(config, field) or "")
            if value and Path(value).exists():
                written = family.save_companion(config, field, Path(value).absolute(),
                                                staging / name)
                _set_field(config, field, str(written.relative_to(staging)))
        write_config(staging, config)
        save_file(_flat_variables(variables), str(staging / WEIGHTS_FILE),
                  metadata={"format": "clipsep-jax", "model_kind": config.model.kind})
        write_text_atomic(staging / CARD_FILE, model_card(config, step=step,
                                                          evaluation=evaluation,
                                                          dataset=dataset))
        if not folder.exists():
            staging.rename(folder)
            return folder
        for name in companions.values():  # an earlier model's bundled copy, if this has none
            stale = folder / name
            if stale.exists() and not (staging / name).exists():
                shutil.rmtree(stale)
        for item in sorted(staging.iterdir()):
            target = folder / item.name
            old = folder / f".{item.name}.old-{os.getpid()}" if target.exists() else None
            if old is not None:
                target.rename(old)
            item.rename(target)
            if old is not None:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_pretrained(name_or_path: str | Path, **hub_kwargs: Any
                    ) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) of a pretrained folder or Hugging Face hub id (downloaded into, or
    with ``HF_HUB_OFFLINE=1`` read from, the Hugging Face cache; ``hub_kwargs`` such as
    ``revision``, ``cache_dir``, ``token`` go to ``snapshot_download``). Every weight is
    checked against the config's model: a missing, unexpected or mis-shaped one is refused by
    name. A bundled query encoder is pointed at by an absolute path."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        if not looks_like_hub_id(str(name_or_path)):
            raise CheckpointError(f"{name_or_path}: no such folder, and not a hub id "
                                  "(owner/name)")
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(name_or_path), **hub_kwargs))
        except Exception as e:  # offline and not cached, unknown repository, no network
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{name_or_path}: cannot get it from the Hugging Face hub "
                                  f"or its cache ({first})") from e
    if not is_pretrained_folder(folder):
        raise CheckpointError(f"{folder}: not a pretrained folder (config.json + "
                              f"{WEIGHTS_FILE})")
    config = load_config(folder)
    for field, name in get_family(config).companions(config).items():
        value = str(_field(config, field) or "")
        if value.split("/")[0] == name:  # bundled with the model
            bundled = folder / value
            if not bundled.exists():
                raise CheckpointError(f"{bundled}: the bundled {field} is missing")
            _set_field(config, field, str(bundled.absolute()))
    return config, _read_weights(folder / WEIGHTS_FILE, config)


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _read_weights(path: Path, config: ml_collections.ConfigDict) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    expected = {"/".join(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in
                jax.tree_util.tree_leaves_with_path(jax.eval_shape(
                    lambda: get_family(config).init_variables(config, jax.random.PRNGKey(0))))}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [f"{k} {tuple(flat[k].shape)} (the config's model needs "
             f"{tuple(expected[k].shape)})" for k in sorted(set(flat) & set(expected))
             if tuple(flat[k].shape) != tuple(expected[k].shape)]
    for problems, what in ((missing, "lacks"), (unexpected, "has unexpected weights"),
                           (wrong, "has mis-shaped weights")):
        if problems:
            raise CheckpointError(f"{path} {what}: {', '.join(problems[:6])}"
                                  f"{' ...' if len(problems) > 6 else ''}; is it of this "
                                  "folder's config.json?")
    variables: dict = {}
    for key, value in flat.items():
        node = variables
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.astype(expected[key].dtype)
    return variables


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False,
                token: str | None = None, commit_message: str = "Upload clipsep-jax model"
                ) -> str:
    """Uploads a pretrained folder to the Hugging Face hub repository ``repo_id`` (created if
    missing); returns the commit URL."""
    from huggingface_hub import HfApi

    if not is_pretrained_folder(folder):
        raise CheckpointError(f"{folder}: not a pretrained folder (config.json + "
                              f"{WEIGHTS_FILE})")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


# What a card tells a user to do, by the first of these Family methods the model's family has:
# (method, what the model is, Python lines after loading it, the command line).
_CARD_USES = (
    ("separator", "A text-queried sound separation model",
     ["separator = get_family(config).separator(config, variables)",
      'outputs = separator.separate(waveform, sample_rate, ["a query"])'],
     "`python -m clipsep_jax.separate --checkpoint=THIS_REPO_OR_FOLDER --input=IN --text=QUERY "
     "--output-dir=OUT`, or the web page `python -m clipsep_jax.app "
     "--checkpoint=THIS_REPO_OR_FOLDER`"),
    ("generator", "A text-to-audio generator",
     ["generator = get_family(config).generator(config, variables)",
      'samples = generator.generate(["a query"])'],
     "`python -m clipsep_jax.generate --checkpoint=THIS_REPO_OR_FOLDER --text=QUERY "
     "--output-dir=OUT`"),
)


def _card_use(family: Family) -> list[str]:
    """The card's opening and "Use" section, by what the family's models do."""
    summary, code, command = "A model", [], None
    for method, *use in _CARD_USES:
        if getattr(type(family), method) is not getattr(Family, method):
            summary, code, command = use
            break
    return [f"{summary} trained with clipsep-jax (JAX/Flax).", "", "## Use", "", "```python",
            "from clipsep_jax import inference", "from clipsep_jax.families import get_family",
            "", 'config, variables = inference.load_for_inference("THIS_REPO_OR_FOLDER")',
            *code, "```", "", *([f"or {command}.", ""] if command else [])]


def model_card(config: ml_collections.ConfigDict, *, step: int | None = None,
               evaluation: str | None = None, dataset: dict | None = None) -> str:
    """The generated model card (README.md): what the model is and how to use it, the models it
    uses, the data it saw, its evaluation table and its training config."""
    family = get_family(config)
    q, t, d = config.query, config.train, config.data
    lines = [
        "---", "library_name: clipsep-jax", "pipeline_tag: audio-to-audio",
        "tags: [audio-source-separation, text-queried-separation, jax, flax, "
        f"{config.model.kind}]", "---", "",
        f"# {config.model.kind} ({family.describe_model(config)})", "",
        *_card_use(family), "## Models it uses", "",
    ]
    for field, name in family.companions(config).items():
        value = str(_field(config, field) or "")
        where = (" (bundled in this folder)" if value.split("/")[0] == name else
                 " (Hugging Face hub id; loaded on first use)" if looks_like_hub_id(value)
                 else " (loaded on first use)")
        if field == "query.encoder_model":
            lines.append(f"- query encoder `{q.encoder}` from `{value}`{where}; query mode in "
                         f"training: {q.mode}; text template: `{q.text_template}`.")
        else:
            lines.append(f"- `{field}`: `{value}`{where}.")
    lines += [
        "",
        "## Training data", "",
        f"Dataset `{d.name}`" + (f" (splits train={d.train_split}, val={d.val_split}, "
                                 f"test={d.test_split})" if d.name else "") + ".",
    ]
    if dataset:
        for key, value in dataset.items():
            lines.append(f"- {key}: {value}")
    lines += ["", "## Training", "",
              f"{'Trained for ' + str(step) + ' steps' if step is not None else 'Steps: unknown'}"
              f" of batch {t.batch_size}, peak learning rate {t.learning_rate} "
              f"({t.lr_schedule}), seed {t.seed}.", ""]
    if evaluation:
        lines += ["## Evaluation", "", evaluation.strip(), ""]
    lines += ["## Config", "", "<details><summary>config.json</summary>", "", "```json",
              config.to_json_best_effort(indent=2, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(lines)
