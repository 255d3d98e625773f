r"""Build a CLIPSep dataset (TFDS, ArrayRecord): waveform, STFT and CLIP embeddings per clip.

  python -m data_prep.build --dataset=music --manual_dir=IN --data_dir=OUT \
      --clip=openai/clip-vit-base-patch32

For the paper's baselines add --resnet=timm/resnet18.tv_in1k (SOP: frozen ResNet-18 frame
vectors beside CLIP's) and --bert=google/bert_uncased_L-4_H-256_A-4 (BERTSep: a vector per label
in the dataset's metadata).

IN holds either train.csv, val.csv and test.csv (the reference's index layout) or vggsound.csv
with the video files (see data_prep/sources.py). The dataset lands in OUT/<dataset>/1.0.0/ with
the skip report skipped.csv beside it; read it with tfds.data_source(<dataset>, data_dir=OUT).
A re-run after an interruption reuses the finished work shards (OUT/_work/...).

AudioCaps, for the weakly supervised text-queried separator, needs no CLIP (none is loaded):

  python -m data_prep.build --dataset=audiocaps --manual_dir=IN --data_dir=OUT

IN holds AudioCaps' train.csv, val.csv (optional: without it --val_fraction of train becomes val)
and test.csv (audiocap_id,youtube_id,start_time,caption) and the clips' audio or video files,
named {youtube_id}_{start:06d}, {youtube_id}_{start} or {youtube_id}, under IN/audio, IN/video
or IN (or --video_dir). One example per caption: clip_id, audiocap_id, caption, its clauses and
the 16 kHz mono waveform cropped to --max_seconds (see data_prep/audiocaps.py); skipped rows are
in OUT/audiocaps/1.0.0/skipped.csv. It builds in this process only (no Beam).

On a cluster, the same builder runs through Apache Beam; the input and output folders must be
paths that every worker sees (a shared mount), e.g. on Flink:

  python -m data_prep.build --dataset=vggsound --manual_dir=/mnt/shared/vggsound \
      --data_dir=/mnt/shared/tfds --beam_options="--runner=FlinkRunner \
      --flink_master=HOST:8081 --environment_type=DOCKER \
      --environment_config=REGISTRY/clipsep-beam-worker:latest"

where the worker image is apache/beam_python3.11_sdk with this package installed. On one large
machine: --beam_runner=DirectRunner --beam_options="--direct_num_workers=8
--direct_running_mode=multi_processing".
"""

from __future__ import annotations

import os
import shlex
import sys
import time

import tensorflow_datasets as tfds
from absl import app, flags

from clipsep_jax import errors
from clipsep_jax.encoders.clip import DEFAULT_CLIP, TEXT_TEMPLATE
from data_prep import audiocaps
from data_prep.builders import BUILDERS, InputOptions, clear_work_dir, skip_summary
from data_prep.extract import ExtractOptions
from data_prep.sources import detect_layout

_DATASET = flags.DEFINE_enum(
    "dataset", None, ["music", "vggsound", "audiocaps"], "Which dataset to build.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir",
    None,
    "Input folder: train.csv/val.csv/test.csv (index layout) or vggsound.csv and videos.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Output TFDS data dir; the dataset goes to DATA_DIR/<dataset>/<version>/."
)
_CLIP = flags.DEFINE_string(
    "clip", DEFAULT_CLIP, "CLIP checkpoint: Hugging Face hub id or local folder."
)
_RESNET = flags.DEFINE_string(
    "resnet", None,
    "Also store SOP's frame vectors from this frozen ImageNet ResNet (dilated, max-pooled): a "
    "hub id such as timm/resnet18.tv_in1k, a folder, a .pth file, or torchvision:resnet18.")
_BERT = flags.DEFINE_string(
    "bert", None,
    "Also store BERTSep's label vectors from this BERT (hub id such as "
    "google/bert_uncased_L-4_H-256_A-4, or a folder) in the dataset's metadata.")
_BERT_POOLING = flags.DEFINE_enum(
    "bert_pooling", "mean", ["mean", "cls", "pooler"],
    "How BERT's token states become a label vector (see clipsep_jax/encoders/bert.py).")
_BERT_TEMPLATE = flags.DEFINE_string(
    "bert_template", "{}", "The text BERT embeds for a label ({} is the label).")
_CLIP_DTYPE = flags.DEFINE_enum(
    "clip_dtype", "float32", ["float32", "bfloat16"], "CLIP compute dtype."
)
_CLIP_BATCH = flags.DEFINE_integer(
    "clip_batch_size", 64, "Frames per CLIP call, split over all local accelerators."
)
_LAYOUT = flags.DEFINE_enum(
    "layout",
    "auto",
    ["auto", "index", "videos"],
    "Input layout; auto: index if train.csv exists, videos if vggsound.csv exists.",
)
_ROOT = flags.DEFINE_string(
    "root", None, "Index layout: relative paths in the CSVs are under this (default: manual_dir)."
)
_VIDEO_DIR = flags.DEFINE_string(
    "video_dir",
    None,
    "Videos layout and audiocaps: folder searched for the media files (default: "
    "manual_dir/video if it exists, else manual_dir; audiocaps: manual_dir/audio and "
    "manual_dir/video, those that exist, else manual_dir).",
)
_CSV = flags.DEFINE_string("csv", "vggsound.csv", "Videos layout: the CSV's name in manual_dir.")
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.1,
    "Videos layout, and audiocaps without val.csv: fraction of training clips that become "
    "validation (chosen by a hash of the clip id)."
)
_TRIM = flags.DEFINE_bool(
    "trim_videos",
    False,
    "Videos layout: the files are full-length videos; cut "
    "clip_seconds from each row's start_seconds.",
)
_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 10.0, "Segment length with --trim_videos.")
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds", 10.0, "audiocaps: each clip is cropped to at most this many seconds.")
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", 16000, "Audio is resampled to this (Hz).")
_FPS = flags.DEFINE_float("fps", 1.0, "Video frame rate of the frame embeddings.")
_MIN_SAMPLES = flags.DEFINE_integer(
    "min_samples", 65535, "Clips with fewer samples (the training crop) are skipped."
)
_SILENCE = flags.DEFINE_float(
    "silence_threshold", 1e-4, "Clips whose peak amplitude is below this are skipped as silent."
)
_TEMPLATE = flags.DEFINE_string("text_template", TEXT_TEMPLATE, "Prompt of the text embedding.")
_WORKERS = flags.DEFINE_integer("num_workers", 4, "Decoding threads.")
_SHARD = flags.DEFINE_integer(
    "clips_per_shard", 32, "Clips per resumable work shard (bounds memory)."
)
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Where work shards are cached (default: DATA_DIR/_work/<dataset>/<version>)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rebuild a dataset that exists (finished work shards are reused)."
)
_FRESH = flags.DEFINE_bool("fresh", False, "Also discard the cached work shards.")
_BEAM_RUNNER = flags.DEFINE_string(
    "beam_runner", None, "Run through Apache Beam with this runner, e.g. DirectRunner."
)
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_options", None, "Beam pipeline options, e.g. '--runner=DataflowRunner --project=P'."
)


def build_dataset(argv_flags=None) -> tuple:
    """Builds the dataset the flags describe; returns (builder, seconds)."""
    for name, value in (("--manual_dir", _MANUAL_DIR.value), ("--data_dir", _DATA_DIR.value)):
        if not value:
            raise app.UsageError(f"{name} is required")
        if "://" in value:
            raise app.UsageError(
                f"{name}={value}: object-store URLs are not supported yet; use a filesystem path "
                "(on a cluster, a shared mount at the same path on every worker)")
    if not os.path.isdir(_MANUAL_DIR.value):
        raise app.UsageError(f"--manual_dir={_MANUAL_DIR.value}: no such folder")
    use_beam = bool(_BEAM_RUNNER.value or _BEAM_OPTIONS.value)
    if _DATASET.value == "audiocaps":
        if use_beam:
            raise app.UsageError(
                "--beam_runner/--beam_options: audiocaps is built in this process only")
        audiocaps.split_files(_MANUAL_DIR.value)  # names the CSV it lacks
        builder = audiocaps.Audiocaps(
            data_dir=_DATA_DIR.value,
            sample_rate=_SAMPLE_RATE.value,
            max_seconds=_MAX_SECONDS.value,
            silence_threshold=_SILENCE.value,
            val_fraction=_VAL_FRACTION.value,
            media_dir=_VIDEO_DIR.value,
            num_workers=_WORKERS.value,
            work_dir=_WORK_DIR.value,
        )
    else:
        builder = _clip_dataset_builder(use_beam)
    if _FRESH.value:
        clear_work_dir(builder.work_dir)
    beam_runner = beam_options = None
    if use_beam:
        import apache_beam as beam  # optional ([beam] extra); only Beam runs need it

        beam_options = beam.options.pipeline_options.PipelineOptions(
            shlex.split(_BEAM_OPTIONS.value or "")
        )
        if _BEAM_RUNNER.value:
            beam_runner = _BEAM_RUNNER.value
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if _OVERWRITE.value or _FRESH.value
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    config = tfds.download.DownloadConfig(
        manual_dir=_MANUAL_DIR.value,
        download_mode=mode,
        beam_runner=beam_runner,
        beam_options=beam_options,
    )
    start = time.perf_counter()
    builder.download_and_prepare(download_config=config)
    return builder, time.perf_counter() - start


def _clip_dataset_builder(use_beam: bool):
    """The ``music`` or ``vggsound`` builder (waveform, STFT, CLIP embeddings) the flags
    describe."""
    if _LAYOUT.value == "auto":
        detect_layout(_MANUAL_DIR.value)  # names the folder and what it lacks
    return BUILDERS[_DATASET.value](
        data_dir=_DATA_DIR.value,
        clip=_CLIP.value,
        clip_dtype=_CLIP_DTYPE.value,
        clip_batch_size=_CLIP_BATCH.value,
        inputs=InputOptions(
            layout=_LAYOUT.value,
            root=_ROOT.value,
            video_dir=_VIDEO_DIR.value,
            csv_name=_CSV.value,
            val_fraction=_VAL_FRACTION.value,
            trim_videos=_TRIM.value,
        ),
        options=ExtractOptions(
            sample_rate=_SAMPLE_RATE.value,
            fps=_FPS.value,
            min_samples=_MIN_SAMPLES.value,
            silence_threshold=_SILENCE.value,
            clip_seconds=_CLIP_SECONDS.value,
            text_template=_TEMPLATE.value,
        ),
        num_workers=_WORKERS.value,
        clips_per_shard=_SHARD.value,
        work_dir=_WORK_DIR.value,
        use_beam=use_beam,
        resnet=_RESNET.value,
        bert=_BERT.value,
        bert_pooling=_BERT_POOLING.value,
        bert_template=_BERT_TEMPLATE.value,
    )


def print_summary(builder, seconds: float) -> None:
    """Examples per split, skips per reason, repairs, throughput and bytes per 10 s clip."""
    info = builder.info
    total = sum(s.num_examples for s in info.splits.values())
    print(f"\n{builder.name} {builder.version} in {os.fspath(builder.data_path)}")
    for name, split in sorted(info.splits.items()):
        print(f"  {name}: {split.num_examples} clips, {split.num_bytes / 2**20:.1f} MiB")
    skips = getattr(builder, "last_skips", None)
    if skips is None:
        print("  (already built; pass --overwrite to rebuild)")
        return
    print(f"  skipped: {len(skips)} (listed in {os.fspath(builder.data_path)}/skipped.csv)")
    for reason, count in skip_summary(skips).items():
        print(f"    {count:6d}  {reason}")
    for note, count in sorted(getattr(builder, "last_notes", {}).items()):
        print(f"  repaired: {count} x {note}")
    print(f"  {total} clips in {seconds:.1f} s: {total / max(seconds, 1e-9):.2f} clips/s")


def run(argv: list[str]):
    """Parses ``argv`` (flags, as on the command line) and builds; for tests and scripts."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["data_prep.build", *argv])
    builder, seconds = build_dataset()
    print_summary(builder, seconds)
    return builder


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DATASET.value is None:
        raise app.UsageError("--dataset is required (music, vggsound or audiocaps)")
    try:
        builder, seconds = build_dataset()
    except errors.USER_ERRORS as e:  # the message names the file, split or value
        sys.exit(errors.report(e))
    print_summary(builder, seconds)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
