"""TFDS builders ``music``, ``vggsound`` and ``synth_music``: clips with waveform, STFT and CLIP
embeddings; optionally the SOP baseline's ResNet frame vectors (``resnet=``, feature
``resnet_frame_embeddings``) and the BERTSep baseline's label vectors (``bert=``, metadata
``label_embeddings``: encoder, model, pooling, template and a vector per label).

Each example is one clip (see :func:`features`). Both builders read either input layout of
:mod:`data_prep.sources` from the manual folder and write ArrayRecord files, so that
``tfds.data_source(name, data_dir=...)`` gives random access for grain.

Two ways to run the same extraction:

- in this process (default): clips are extracted in work shards of ``clips_per_shard`` clips
  cached under ``work_dir``; a re-run reuses finished shards, so an interrupted job resumes.
- through Apache Beam (``use_beam=True`` and a ``beam_runner`` in the download config): one
  element per clip, batched for CLIP, on any Beam runner (DirectRunner, Dataflow, Spark, Flink).

The skip report ``skipped.csv`` (split, source, reason) and the record index
``record_index.json`` (each split's text features in record order) are written into the version
folder.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

try:  # optional: only the Beam path needs it
    import apache_beam as beam
except ImportError:  # pragma: no cover
    beam = None

from clipsep_jax.encoders.bert import BERT
from clipsep_jax.encoders.clip import CLIP, DEFAULT_CLIP, text_prompt
from clipsep_jax.encoders.resnet import ResNet
from clipsep_jax.errors import UserError
from clipsep_jax.files import write_text_atomic
from clipsep_jax.input_pipeline import RECORD_INDEX_FILE, as_text
from data_prep import tfds_compat
from data_prep.extract import ExtractedClip, ExtractOptions, Extractor, make_example
from data_prep.media import require_ffmpeg
from data_prep.sources import ClipSource, Skip, detect_layout, read_index, read_videos

__all__ = ["ClipDatasetBuilder", "Music", "Vggsound", "BUILDERS", "features", "skip_summary",
           "write_record_index"]

_STFT_LAYOUT = (
    "stft[t, f] = (real, imag) of the centred STFT (Hann, reflect padding) of the whole "
    "waveform; frame t is centred on sample t * hop_length"
)


def features(options: ExtractOptions, resnet: bool = False) -> tfds.features.FeaturesDict:
    """The features of one clip (with SOP's ResNet frame vectors when ``resnet``). Large arrays
    are stored as raw bytes (fast numpy decoding)."""
    raw = tfds.features.Encoding.BYTES
    extra = {}
    if resnet:
        extra["resnet_frame_embeddings"] = tfds.features.Tensor(
            shape=(None, None), dtype=np.float16, encoding=raw,
            doc=f"max-pooled frozen ResNet vector of every frame at {options.fps:g} fps (SOP)")
    return tfds.features.FeaturesDict(
        {
            **extra,
            "id": tfds.features.Text(doc="clip id, unique in the dataset"),
            "label": tfds.features.Text(doc="class label as given (folder name or CSV label)"),
            "split": tfds.features.Text(),
            "source": tfds.features.Text(doc="the audio or video file the clip came from"),
            "waveform": tfds.features.Tensor(
                shape=(None,),
                dtype=np.float32,
                encoding=raw,
                doc=f"mono waveform at {options.sample_rate} Hz",
            ),
            "stft": tfds.features.Tensor(
                shape=(None, options.num_bins, 2), dtype=np.float32, encoding=raw, doc=_STFT_LAYOUT
            ),
            "frame_embeddings": tfds.features.Tensor(
                shape=(None, None),
                dtype=np.float16,
                encoding=raw,
                doc=f"unnormalised CLIP image embedding of every frame at {options.fps:g} fps",
            ),
            "text_embedding": tfds.features.Tensor(
                shape=(None,),
                dtype=np.float32,
                encoding=raw,
                doc="unnormalised CLIP text embedding of the label prompt",
            ),
            "text_embedding_ensemble": tfds.features.Tensor(
                shape=(None,),
                dtype=np.float32,
                encoding=raw,
                doc="mean of the unnormalised CLIP text embeddings of the prompt ensemble",
            ),
        }
    )


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """Where the clips come from (see :mod:`data_prep.sources`)."""

    layout: str = "auto"  # auto | index | videos
    root: str | None = None  # index layout: paths are relative to this (default: manual dir)
    video_dir: str | None = None  # videos layout (default: manual_dir/video or manual_dir)
    csv_name: str = "vggsound.csv"
    val_fraction: float = 0.1
    trim_videos: bool = False


class ClipDatasetBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared by ``music`` and ``vggsound``; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Waveform, whole-clip STFT, CLIP frame and label embeddings."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    The manual folder holds either the reference's index CSVs (train.csv, val.csv, test.csv:
    audio path, frames folder, frame count[, label]) with the files they name, or
    vggsound.csv (youtube_id, start_seconds, label, split) with the video files.
    """

    def __init__(
        self,
        *,
        clip: str = DEFAULT_CLIP,
        clip_dtype: str = "float32",
        clip_batch_size: int = 64,
        inputs: InputOptions | None = None,
        options: ExtractOptions | None = None,
        num_workers: int = 4,
        clips_per_shard: int = 32,
        work_dir: str | None = None,
        use_beam: bool = False,
        resnet: str | None = None,
        bert: str | None = None,
        bert_pooling: str = "mean",
        bert_template: str = "{}",
        **kwargs,
    ):
        self.clip_name = clip
        self.resnet_name = resnet or None
        self.bert_name = bert or None
        self.bert_pooling = bert_pooling
        self.bert_template = bert_template
        self.clip_dtype = clip_dtype
        self.clip_batch_size = clip_batch_size
        self.inputs = inputs or InputOptions()
        self.options = options or ExtractOptions()
        self.num_workers = num_workers
        self.clips_per_shard = clips_per_shard
        self.use_beam = use_beam
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.work_dir = work_dir or os.path.join(
            os.fspath(self._data_dir_root), "_work", self.name, str(self.version)
        )
        self._extractor: Extractor | None = None
        self._skips: list[Skip] | None = None
        self._notes: collections.Counter = collections.Counter()

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features(self.options, resnet=bool(self.resnet_name)),
            metadata=tfds.core.MetadataDict(),
            homepage="https://sony.github.io/CLIPSep/",
            disable_shuffling=False,
        )

    # -- reading the inputs --------------------------------------------------------------------

    def _sources(self, manual_dir: str) -> tuple[list[ClipSource], list[Skip]]:
        layout = self.inputs.layout
        if layout == "auto":
            layout = detect_layout(manual_dir)
        if layout == "index":
            return read_index(manual_dir, self.inputs.root)
        if layout == "videos":

            require_ffmpeg()
            return read_videos(
                manual_dir,
                self.inputs.video_dir,
                self.inputs.csv_name,
                self.inputs.val_fraction,
                self.inputs.trim_videos,
            )
        raise UserError(f"layout must be auto, index or videos, got {layout!r}")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return self._splits_from(os.fspath(dl_manager.manual_dir))

    def _splits_from(self, manual_dir: str):
        sources, skips = self._sources(manual_dir)
        self._skips = list(skips)
        labels = sorted({s.label for s in sources})
        self.info.metadata.update(
            {
                "labels": labels,
                "clip": self.clip_name,
                "sample_rate": self.options.sample_rate,
                "n_fft": self.options.n_fft,
                "hop_length": self.options.hop_length,
                "win_length": self.options.win_length,
                "fps": self.options.fps,
                "text_template": self.options.text_template,
                "stft_layout": _STFT_LAYOUT,
            }
        )
        if self.resnet_name:
            self.info.metadata["resnet"] = self.resnet_name
        if self.bert_name:
            self.info.metadata["label_embeddings"] = bert_label_embeddings(
                self.bert_name, labels, self.bert_pooling, self.bert_template)
        if self.use_beam:
            for stale in glob.glob(os.path.join(self.work_dir, "beam-skipped-*")):
                os.remove(stale)
        by_split = group_by_split(sources, skips, manual_dir, self._work_report_dir(), "clip")
        return {split: self._generate_examples(split, items) for split, items in by_split.items()}

    def _generate_examples(self, split: str, sources: Sequence[ClipSource]):
        if self.use_beam:
            return _beam_transform(self, split, sources)
        return self._generate_in_process(split, sources)

    # -- in-process generation with resumable work shards --------------------------------------

    def _extractor_instance(self) -> Extractor:
        if self._extractor is None:
            clip = CLIP.from_pretrained(
                self.clip_name, dtype=self.clip_dtype, batch_size=self.clip_batch_size
            )
            self._extractor = Extractor(clip, self.options, self.num_workers,
                                        _load_resnet(self.resnet_name, self.clip_dtype,
                                                     self.clip_batch_size))
        return self._extractor

    def _shard_path(self, split: str, index: int, shard: Sequence[ClipSource]) -> str:
        fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "sources": [dataclasses.asdict(s) for s in shard],
                    "clip": self.clip_name,
                    "clip_dtype": self.clip_dtype,
                    "options": dataclasses.asdict(self.options),
                    **({"resnet": self.resnet_name} if self.resnet_name else {}),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        return os.path.join(self.work_dir, f"{split}-{index:05d}-{fingerprint}.npz")

    def _generate_in_process(self, split: str, sources: Sequence[ClipSource]) -> Iterator:
        os.makedirs(self.work_dir, exist_ok=True)
        shards = [
            sources[i : i + self.clips_per_shard]
            for i in range(0, len(sources), self.clips_per_shard)
        ]
        progress = tqdm(
            total=len(sources),
            desc=f"{self.name} {split}",
            unit="clip",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        reused = 0
        yielded = 0
        for index, shard in enumerate(shards):
            path = self._shard_path(split, index, shard)
            if os.path.exists(path):
                clips, skips = _load_shard(path, shard)
                reused += 1
                progress.update(len(shard))
            else:
                clips, skips = [], []
                for _, result in self._extractor_instance().run(shard):
                    (skips if isinstance(result, Skip) else clips).append(result)
                    progress.update(1)
                _save_shard(path, clips, skips)
            self._skips.extend(skips)
            for clip in clips:
                self._notes.update(clip.notes)
                text = self._text_embeddings(clip.source.label)
                yielded += 1
                yield clip.source.clip_id, make_example(clip, text, self.options)
        progress.close()
        if not yielded:
            split_skips = [s for s in self._skips if s.split == split]
            report = write_skip_report(self._work_report_dir(), self._skips)
            raise UserError(
                f"split {split}: all {len(sources)} clips were skipped, listed with their reasons "
                f"in {report} (" + ", ".join(
                    f"{n} x {r}" for r, n in skip_summary(split_skips).items()) + ")")
        if reused:
            print(
                f"{self.name} {split}: reused {reused} of {len(shards)} finished work shards",
                file=sys.stderr,
            )

    def _work_report_dir(self) -> str:
        """Where the skip report goes when no dataset is written (the work folder)."""
        os.makedirs(self.work_dir, exist_ok=True)
        return self.work_dir

    def _text_embeddings(self, label: str):
        return self._extractor_instance().text_embeddings(label)

    # -- the skip report -----------------------------------------------------------------------

    def download_and_prepare(self, *args, **kwargs):
        tfds_compat.install()  # splits over 1 GB spill to disk, which TFDS does through TF
        super().download_and_prepare(*args, **kwargs)
        if self._skips is None:  # already prepared: nothing was generated this time
            return
        skips = list(self._skips)
        if self.use_beam:
            for path in sorted(glob.glob(os.path.join(self.work_dir, "beam-skipped-*"))):
                with open(path) as f:
                    skips += [Skip(**json.loads(line)) for line in f if line.strip()]
        write_skip_report(os.fspath(self.data_path), skips)
        write_record_index(self)
        self.last_skips = skips
        self.last_notes = dict(self._notes)


def _load_resnet(name: str | None, dtype: str, batch_size: int) -> ResNet | None:
    if not name:
        return None
    return ResNet.from_pretrained(name, dtype=dtype, batch_size=batch_size)


def bert_label_embeddings(name: str, labels: Sequence[str], pooling: str,
                          template: str) -> dict:
    """The ``label_embeddings`` metadata: each label's text (``template`` filled with the label,
    underscores as spaces) embedded by the BERT ``name``, with what made them."""
    bert = BERT.from_pretrained(name, pooling=pooling)
    vectors = bert.encode_text([text_prompt(label, template) for label in labels])
    return {"encoder": "bert", "model": name, "pooling": pooling, "template": template,
            "vectors": {label: [float(x) for x in v] for label, v in zip(labels, vectors,
                                                                          strict=True)}}


def _save_shard(path: str, clips: list[ExtractedClip], skips: list[Skip]) -> None:
    """One work shard, written to a temporary name and renamed."""
    waveforms = [c.waveform for c in clips]
    embeddings = [c.frame_embeddings for c in clips]
    resnet = [c.resnet_embeddings for c in clips if c.resnet_embeddings is not None]
    if resnet and len(resnet) != len(clips):
        raise RuntimeError("some clips of a work shard have ResNet vectors and some do not")
    meta = {
        "clips": [{"clip_id": c.source.clip_id, "notes": c.notes} for c in clips],
        "skips": [dataclasses.asdict(s) for s in skips],
    }
    dim = embeddings[0].shape[1] if embeddings else 0
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            waveforms=np.concatenate(waveforms) if waveforms else np.zeros(0, np.float32),
            waveform_lengths=np.array([len(w) for w in waveforms], np.int64),
            embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float16),
            embedding_counts=np.array([len(e) for e in embeddings], np.int64),
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            **({"resnet_embeddings": np.concatenate(resnet)} if resnet else {}),
        )
    os.replace(tmp, path)


def _load_shard(path: str, shard: Sequence[ClipSource]) -> tuple[list[ExtractedClip], list[Skip]]:
    by_id = {s.clip_id: s for s in shard}
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        lengths, counts = data["waveform_lengths"], data["embedding_counts"]
        waveforms = np.split(data["waveforms"], np.cumsum(lengths)[:-1]) if len(lengths) else []
        embeddings = np.split(data["embeddings"], np.cumsum(counts)[:-1]) if len(counts) else []
        resnet = [None] * len(embeddings)
        if "resnet_embeddings" in data and len(counts):
            resnet = np.split(data["resnet_embeddings"], np.cumsum(counts)[:-1])
    clips = [
        ExtractedClip(by_id[m["clip_id"]], w, e, m["notes"], r)
        for m, w, e, r in zip(meta["clips"], waveforms, embeddings, resnet, strict=True)
    ]
    return clips, [Skip(**s) for s in meta["skips"]]


def group_by_split(items: Sequence[Any], skips: Sequence[Skip], manual_dir: str,
                   report_dir: str, what: str) -> dict[str, list]:
    """``items`` (each with ``.split``) by split; a split listed (by an item or a skip) without
    a usable item is refused, naming the skip report written into ``report_dir``."""
    by_split: dict[str, list] = collections.defaultdict(list)
    for item in items:
        by_split[item.split].append(item)
    listed = {s.split for s in skips} | set(by_split)
    empty = sorted(split for split in listed if not by_split.get(split))
    if empty:
        report = write_skip_report(report_dir, skips)
        raise UserError(
            f"{manual_dir}: no usable {what} listed for split(s) {', '.join(empty)}; "
            f"{len(skips)} rows skipped, listed with their reasons in {report} ("
            + ", ".join(f"{n} x {r}" for r, n in skip_summary(skips).items()) + ")")
    return dict(by_split)


def write_skip_report(version_dir: str, skips: Sequence[Skip]) -> str:
    """``skipped.csv`` (split, source, reason) in ``version_dir``, via a temporary name."""
    path = os.path.join(version_dir, "skipped.csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["split", "source", "reason"])
    for s in sorted(skips, key=lambda s: (s.split, s.source)):
        writer.writerow([s.split, s.source, s.reason])
    with open(path + ".tmp", "w", newline="") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)
    return path


def _is_text(feature: tfds.features.FeatureConnector) -> bool:
    return isinstance(feature, tfds.features.Text) or (
        isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature,
                                                                   tfds.features.Text))


def write_record_index(builder: tfds.core.DatasetBuilder) -> str:
    """Writes ``record_index.json`` into the prepared version folder: {split: {feature: [value of
    record 0, 1, ...]}} for every text feature (Text, or a Sequence of Text as a list), in the
    order the records are read. Training groups clips by label, clip or caption from it without
    reading the records (megabytes each; :func:`clipsep_jax.input_pipeline.record_column`).
    One pass over the written dataset, the other features left undecoded."""
    features = builder.info.features
    text = [name for name, feature in features.items() if _is_text(feature)]
    decoders = {name: tfds.decode.SkipDecoding() for name in features if name not in text}
    index = {}
    for split, source in builder.as_data_source(decoders=decoders).items():
        columns: dict[str, list] = {name: [] for name in text}
        for i in range(len(source)):
            record = source[i]
            for name in text:
                columns[name].append(as_text(record[name]))
        index[split] = columns
    path = os.path.join(os.fspath(builder.data_path), RECORD_INDEX_FILE)
    write_text_atomic(path, json.dumps(index))
    return path


def skip_summary(skips: Sequence[Skip]) -> dict[str, int]:
    """Skipped items per reason (the text before the reason's first colon)."""
    return dict(collections.Counter(s.reason.split(":")[0] for s in skips).most_common())


# ---------------------------------------------------------------------------------------------
# Beam


def _beam_transform(builder: ClipDatasetBuilder, split: str, sources: Sequence[ClipSource]):
    if beam is None:
        raise ImportError("building with Beam needs apache-beam: pip install 'clipsep-jax[beam]'")
    settings = dict(
        clip=builder.clip_name,
        clip_dtype=builder.clip_dtype,
        clip_batch_size=builder.clip_batch_size,
        options=builder.options,
        num_workers=builder.num_workers,
        resnet=builder.resnet_name,
    )
    skipped_prefix = os.path.join(builder.work_dir, f"beam-skipped-{split}")
    os.makedirs(builder.work_dir, exist_ok=True)

    class ExtractClips(beam.PTransform):
        def expand(self, pcoll):
            results = (
                pcoll
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=8)
                | "Extract"
                >> beam.ParDo(_ExtractDoFn(**settings)).with_outputs("skipped", main="examples")
            )
            _ = (
                results.skipped
                | "SkipJson" >> beam.Map(lambda s: json.dumps(dataclasses.asdict(s)))
                | "WriteSkips" >> beam.io.WriteToText(skipped_prefix)
            )
            return results.examples

    return f"Create {split}" >> beam.Create(list(sources)) | f"Extract {split}" >> ExtractClips()


if beam is not None:

    class _ExtractDoFn(beam.DoFn):
        """Extraction in a Beam worker: CLIP is loaded once per worker in ``setup``."""

        def __init__(self, clip, clip_dtype, clip_batch_size, options, num_workers, resnet):
            self.settings = (clip, clip_dtype, clip_batch_size, resnet)
            self.options = options
            self.num_workers = num_workers
            self.extractor = None

        def setup(self):
            clip, dtype, batch, resnet = self.settings
            model = CLIP.from_pretrained(clip, dtype=dtype, batch_size=batch)
            self.extractor = Extractor(model, self.options, self.num_workers,
                                       _load_resnet(resnet, dtype, batch))

        def process(self, batch):
            for source, result in self.extractor.run(batch):
                if isinstance(result, Skip):
                    yield beam.pvalue.TaggedOutput("skipped", result)
                else:
                    text = self.extractor.text_embeddings(source.label)
                    yield source.clip_id, make_example(result, text, self.options)


class Music(ClipDatasetBuilder):
    """MUSIC (solo): 11 instruments, 1-4 minute YouTube videos (Zhao et al., 2018)."""


class Vggsound(ClipDatasetBuilder):
    """VGGSound: about 200k 10-second YouTube clips in 309 classes (Chen et al., 2020)."""


# The builders that read inputs; data_prep.build adds data_prep.synth_music's SynthMusic.
BUILDERS = {"music": Music, "vggsound": Vggsound}


def clear_work_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
