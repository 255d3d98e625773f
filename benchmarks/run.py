"""All benchmarks in one run on this machine, against a PyTorch rendition of the reference.

    python -m benchmarks.run [--only=train_step,end_to_end,nit,separate] [--json=PATH]
        [--repeats=3]

Each benchmark runs in its own process (so its peak host memory is its own), after a
measurement of this machine's fp32 matmul peak (the larger of XLA's and PyTorch's on a 2048^3
product). Timings are medians of ``repeats`` timed repetitions after a warm-up; ratios are
computed pairwise within this run. Prints a markdown table; ``--json`` also writes every figure.

- train_step: the full-size CLIPSep train step (256 x 256 input, 7 levels, width 64, k 32,
  N = 2), batch 8, Flax (jit, donated state) against the PyTorch rendition of the reference
  (``tests/torch_reference.py``, Adam, gradient clipping), same thread count. Model-FLOP
  utilisation (MFU) = the model's FLOPs per step / step time / matmul peak, for both; the
  model's FLOPs are XLA's cost analysis of the step in the reference's formulation (each up
  level upsamples, then convolves at full resolution), which is also what PyTorch executes.
  This project's up levels compute the same function with a quarter of the multiply-adds
  (``model.up_conv_formulation="taps_first"``), so its MFU can exceed 100%; the hardware FLOP
  utilisation (HFU) = the FLOPs the compiled step executes (XLA's cost analysis of it) / step
  time / peak says how busy the machine is.
  The Flax step is also timed in the reference's formulation, which shows what the formulation
  alone is worth.
- nit: the same for CLIPSep-NIT, and its cost relative to the plain step.
- end_to_end: training throughput of this project's way (data_prep's precomputed embeddings
  and spectrograms, the grain pipeline, the jit step) against the reference's way (per example
  and step: WAV crops read, STFTs computed with librosa, 3 JPEG frames per source decoded and
  encoded by a ViT-B/32 CLIP with random weights, then the PyTorch step), on the same rendered
  clips (synth_music).
- separate: 10 s and 60 s of audio, ``Separator.separate`` against a PyTorch + librosa
  rendition of the reference's inference (``benchmarks/separate.py``).

On a GPU, the Flax figures are measured in float32 and bfloat16 and recorded separately.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = ("train_step", "nit", "end_to_end", "separate")
BATCH = 8


def _timed_alternating(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of ``first`` and of ``second``, called in turn (after one warm-up call of
    each), so that this machine's drift weighs on both alike."""
    first(), second()
    times = [], []
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _torch_reference():
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch_reference

    torch.set_num_threads(os.cpu_count() or 1)
    return torch_reference


# -- workers (each runs in its own process) ------------------------------------------------------


def matmul_peak(repeats: int) -> dict:
    """fp32 FLOP/s of a 2048^3 matrix product, XLA and PyTorch; the machine's peak is the larger."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    xla = 2 * n**3 / _timed(lambda: matmul(a, a).block_until_ready(), repeats * 3)
    out = {"xla_matmul_flops": xla}
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        t = torch.from_numpy(np.asarray(a))
        out["torch_matmul_flops"] = 2 * n**3 / _timed(lambda: t @ t, repeats * 3)
    except ImportError:
        pass
    out["peak_flops"] = max(out.values())
    return out


def _flax_step(kind: str, compute_dtype: str, repeats: int,
               up_conv_formulation: str = "taps_first") -> dict:
    from benchmarks.train_step import measure, model_flops_per_step

    result = measure(kind, BATCH, repeats, compute_dtype, up_conv_formulation)
    out = {key: result[key] for key in ("compile_s", "step_s", "examples_per_s")}
    out["executed_flops_per_step"] = result["flops_per_step"]
    out["model_flops_per_step"] = model_flops_per_step(kind, BATCH, compute_dtype)
    return out


def _torch_step(kind: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from benchmarks.train_step import synthetic_batch
    from clipsep_jax.config import default_config

    tr = _torch_reference()
    torch.manual_seed(0)
    model = (tr.CLIPSepNIT() if kind == "clipsep_nit" else tr.CLIPSep()).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = default_config()
    batch = synthetic_batch(config, BATCH)
    mag_mix = torch.from_numpy(batch["mag_mix"])[:, None]
    mags = [torch.from_numpy(np.ascontiguousarray(batch["mags"][:, n]))[:, None]
            for n in range(config.num_sources)]
    queries = [torch.from_numpy(np.ascontiguousarray(batch["queries"][:, n]))
               for n in range(config.num_sources)]

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model(mag_mix, mags, queries)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    seconds = _timed(run, repeats)
    return {"step_s": seconds, "examples_per_s": BATCH / seconds}


def _accelerator_dtypes() -> list[str]:
    import jax

    return ["float32", "bfloat16"] if jax.devices()[0].platform == "gpu" else ["float32"]


def train_step_worker(repeats: int, kind: str = "clipsep") -> dict:
    out = {}
    for dtype in _accelerator_dtypes():
        suffix = "" if dtype == "float32" else f"_{dtype}"
        for key, value in _flax_step(kind, dtype, repeats).items():
            out[f"flax{suffix}_{key}"] = value
    for key, value in _torch_step(kind, repeats).items():
        out[f"torch_{key}"] = value
    if kind == "clipsep":  # the same formulation as PyTorch's: what the formulation alone gives
        for key, value in _flax_step(kind, "float32", repeats, "upsample_first").items():
            out[f"flax_upsample_first_{key}"] = value
    return out


def nit_worker(repeats: int) -> dict:
    return train_step_worker(repeats, "clipsep_nit")


def _bench_dataset(root: Path) -> tuple[str, Path]:
    """synth_music rendered and prepared under ``root`` (8 s clips, 11 instruments):
    (TFDS data dir, the rendered input tree)."""
    from data_prep import synth_music

    data_dir = root / "tfds"
    clip = synth_music.resolve_clip("no-such-hub-id/offline", data_dir)
    builder = synth_music.prepare(data_dir, clip=clip, clips_per_class=(4, 1, 1), seconds=8.0,
                                  min_samples=65535, progress=False)
    tree = next(Path(builder.work_dir).glob("rendered-*"))
    return str(data_dir), tree


def end_to_end_worker(repeats: int, root: str) -> dict:
    import jax
    import numpy as np

    from clipsep_jax import input_pipeline, sharding, train
    from clipsep_jax.config import default_config
    from clipsep_jax.families import get_family

    data_dir, tree = _bench_dataset(Path(root))
    steps = max(3, repeats + 1)

    # This project's way: grain pipeline over the prepared dataset, the sharded jit step.
    config = default_config()
    config.data.name, config.data.data_dir = "synth_music", data_dir
    config.data.num_workers = 0
    config.train.batch_size = BATCH
    mesh = sharding.make_mesh(config)
    source, metadata = input_pipeline.open_split(config.data, "train")
    batches = input_pipeline.training_batches(
        config, get_family(config).training_transform(config, source, metadata), len(source),
        mesh)
    optimizer = train.make_optimizer(config)
    state, shardings = train.sharded_train_state(config, jax.random.PRNGKey(0), optimizer, mesh)
    step = train.sharded_train_step(config, optimizer, mesh, shardings)

    def ours():
        nonlocal state
        state, metrics = step(state, next(batches))
        jax.block_until_ready(metrics)

    ours()  # compiles
    start = time.perf_counter()
    for _ in range(steps):
        ours()
    ours_rate = steps * BATCH / (time.perf_counter() - start)

    # The reference's way: everything per example, every step.
    import csv

    import librosa
    import soundfile
    import torch
    import transformers
    from PIL import Image

    tr = _torch_reference()
    torch.manual_seed(0)
    model = tr.CLIPSep().train()
    torch_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clip_model = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 sizes
    with open(tree / "train.csv") as f:
        rows = list(csv.reader(f))
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    rng = np.random.default_rng(0)

    def frame(path):
        image = Image.open(path).convert("RGB")
        scale = 224 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.BICUBIC)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255
        return ((pixels - mean) / std).transpose(2, 0, 1)

    def example():
        chosen = [rows[i] for i in rng.choice(len(rows), 2, replace=False)]
        specs, frames = [], []
        for audio_path, frames_dir, count, _ in chosen:
            wave, _ = soundfile.read(tree / audio_path, dtype="float32")
            centre = int(rng.integers(4, int(count) - 3))
            start_sample = int((centre - 0.5) * 16000) - 65535 // 2
            crop = wave[max(start_sample, 0): start_sample + 65535]
            crop = np.pad(crop, (0, 65535 - len(crop)))
            crop = np.clip(crop * rng.uniform(0.5, 1.5), -1, 1) / 2
            specs.append(librosa.stft(crop, n_fft=1024, hop_length=256, win_length=1024))
            frames += [frame(tree / frames_dir / f"{centre + k:06d}.jpg") for k in (-1, 0, 1)]
        return specs, np.stack(frames)

    def reference():
        examples = [example() for _ in range(BATCH)]
        pixels = torch.from_numpy(np.concatenate([f for _, f in examples]))
        with torch.no_grad():
            embeddings = clip_model.get_image_features(pixel_values=pixels).pooler_output
        queries = embeddings.view(BATCH, 2, 3, -1).mean(2)
        specs = np.stack([np.stack(s) for s, _ in examples])  # [B, 2, 513, 257]
        mags = torch.from_numpy(np.abs(specs[..., :256]).astype(np.float32))
        mag_mix = torch.from_numpy(np.abs(specs.sum(1)[..., :256]).astype(np.float32))
        torch_optimizer.zero_grad(set_to_none=True)
        loss, _ = model(mag_mix[:, None], [mags[:, n, None] for n in range(2)],
                        [queries[:, n] for n in range(2)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch_optimizer.step()

    reference()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        reference()
    reference_rate = steps * BATCH / (time.perf_counter() - start)
    return {"end_to_end_examples_per_s": ours_rate, "reference_way_examples_per_s": reference_rate,
            "end_to_end_steps": steps}


def separate_worker(repeats: int) -> dict:
    import jax
    import numpy as np

    from benchmarks.separate import torch_rendition
    from clipsep_jax.clip import CLIP
    from clipsep_jax.config import default_config
    from clipsep_jax.encoders.clip_towers import VIT_B32
    from clipsep_jax.models import init_variables
    from clipsep_jax.separate import Separator

    config = default_config()
    separator = Separator(config, init_variables(config, jax.random.PRNGKey(0)),
                          clip=CLIP.random(VIT_B32))
    torch_separate = torch_rendition()
    rng = np.random.default_rng(0)
    out = {}
    for seconds in (10, 60):
        wave = (0.1 * rng.standard_normal(seconds * 16000)).astype(np.float32)
        ours, reference = _timed_alternating(
            lambda w=wave: separator.separate(w, 16000, ["playing bagpipes"]),
            lambda w=wave: torch_separate(w), repeats)
        out[f"flax_separate_{seconds}s_s"] = ours
        out[f"torch_separate_{seconds}s_s"] = reference
    return out


WORKERS = {"matmul": matmul_peak, "train_step": train_step_worker, "nit": nit_worker,
           "end_to_end": end_to_end_worker, "separate": separate_worker}


# -- the orchestrator ---------------------------------------------------------------------------


def _run_worker(name: str, repeats: int, scratch: str) -> dict:
    """Runs one worker in a child process; adds its peak host memory (max RSS, GiB)."""
    out_path = os.path.join(scratch, f"{name}.json")
    command = [sys.executable, "-m", "benchmarks.run", f"--worker={name}",
               f"--repeats={repeats}", f"--worker_out={out_path}", f"--scratch={scratch}"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark {name} failed (exit {os.waitstatus_to_exitcode(status)})")
    with open(out_path) as f:
        result = json.load(f)
    result[f"{name}_peak_host_memory_gib"] = usage.ru_maxrss / 2**20
    result[f"{name}_wall_s"] = time.perf_counter() - start
    return result


def _table(r: dict) -> str:
    peak = r["peak_flops"]
    lines = ["| benchmark | this project | PyTorch rendition / reference's way | ratio | "
             "peak host memory |", "| --- | --- | --- | --- | --- |"]
    for name, kind in (("train_step", "CLIPSep"), ("nit", "CLIPSep-NIT")):
        if f"{name}_flax_examples_per_s" not in r:
            continue
        flax, torch = r[f"{name}_flax_examples_per_s"], r[f"{name}_torch_examples_per_s"]
        flops = r[f"{name}_flax_model_flops_per_step"]
        flax_mfu = flops / r[f"{name}_flax_step_s"] / peak
        flax_hfu = r[f"{name}_flax_executed_flops_per_step"] / r[f"{name}_flax_step_s"] / peak
        torch_mfu = flops / r[f"{name}_torch_step_s"] / peak
        lines.append(f"| {kind} train step, batch {BATCH} | {flax:.2f} ex/s, MFU {flax_mfu:.1%}, "
                     f"HFU {flax_hfu:.1%} | {torch:.2f} ex/s, MFU = HFU {torch_mfu:.1%} | "
                     f"{flax / torch:.2f}x | {r[f'{name}_peak_host_memory_gib']:.2f} GiB |")
        if f"{name}_flax_upsample_first_examples_per_s" in r:
            same = r[f"{name}_flax_upsample_first_examples_per_s"]
            same_mfu = flops / r[f"{name}_flax_upsample_first_step_s"] / peak
            lines.append(f"| {kind} train step, reference formulation (upsample first) | "
                         f"{same:.2f} ex/s, MFU {same_mfu:.1%} | {torch:.2f} ex/s | "
                         f"{same / torch:.2f}x | |")
        if f"{name}_flax_bfloat16_examples_per_s" in r:
            lines.append(f"| {kind} train step, bfloat16 | "
                         f"{r[f'{name}_flax_bfloat16_examples_per_s']:.2f} ex/s | | | |")
    if "nit_flax_step_s" in r and "train_step_flax_step_s" in r:
        lines.append(f"| NIT step / plain step (Flax) | "
                     f"{r['nit_flax_step_s'] / r['train_step_flax_step_s']:.2f}x | "
                     f"{r['nit_torch_step_s'] / r['train_step_torch_step_s']:.2f}x (PyTorch) | | |")
    if "end_to_end_examples_per_s" in r:
        ours, ref = r["end_to_end_examples_per_s"], r["reference_way_examples_per_s"]
        lines.append(f"| end-to-end training, batch {BATCH} | {ours:.2f} ex/s | {ref:.2f} ex/s | "
                     f"{ours / ref:.2f}x | {r['end_to_end_peak_host_memory_gib']:.2f} GiB |")
    for seconds in (10, 60):
        key = f"flax_separate_{seconds}s_s"
        if key in r:
            ours, ref = r[key], r[f"torch_separate_{seconds}s_s"]
            lines.append(f"| separate {seconds} s of audio | {ours:.2f} s | {ref:.2f} s | "
                         f"{ref / ours:.2f}x | {r['separate_peak_host_memory_gib']:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        extra = {"root": args.scratch} if args.worker == "end_to_end" else {}
        result = WORKERS[args.worker](args.repeats, **extra)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return
    selected = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in selected if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(BENCHMARKS)}")
    import jax

    device = jax.devices()[0]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": f"{device.platform} ({device.device_kind})",
        "jax": jax.__version__,
        "repeats": args.repeats,
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipsep-bench-") as scratch:
        results.update(_run_worker("matmul", args.repeats, scratch))
        for name in selected:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result = _run_worker(name, args.repeats, scratch)
            for key, value in result.items():
                prefixed = name in ("train_step", "nit") and not key.startswith(name)
                results[f"{name}_{key}" if prefixed else key] = value
    peak = results["peak_flops"]
    if "train_step_flax_examples_per_s" in results:
        results["flax_train_examples_per_s"] = results["train_step_flax_examples_per_s"]
        results["torch_train_examples_per_s"] = results["train_step_torch_examples_per_s"]
        flops = results["train_step_flax_model_flops_per_step"]
        results["flax_mfu"] = flops / results["train_step_flax_step_s"] / peak
        results["torch_mfu"] = flops / results["train_step_torch_step_s"] / peak
        results["flax_hfu"] = (results["train_step_flax_executed_flops_per_step"]
                               / results["train_step_flax_step_s"] / peak)
    results["total_wall_s"] = time.perf_counter() - start
    print(f"\n{results['date']}, {results['machine']}, {results['device']}, jax "
          f"{results['jax']}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (XLA "
          f"{results['xla_matmul_flops'] / 1e9:.1f}, PyTorch "
          f"{results.get('torch_matmul_flops', float('nan')) / 1e9:.1f}); median of "
          f"{args.repeats} after a warm-up\n")
    print(_table(results))
    print(f"\ntotal {results['total_wall_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
