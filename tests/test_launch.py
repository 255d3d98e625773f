"""launch/ scripts: valid shell, and the commands they build (with stand-ins for the tools)."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_print_usage(script):
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "usage:" in result.stderr


def stand_in(folder: Path, name: str) -> None:
    path = folder / name
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$0" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_with_stand_ins(tmp_path, *command):
    for tool in ("python3", "gcloud", "srun"):
        stand_in(tmp_path, tool)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    result = subprocess.run(["bash", *command], capture_output=True, text=True, env=env,
                            check=True)
    return result.stdout.splitlines()


def test_data_prep_beam_command(tmp_path):
    lines = run_with_stand_ins(tmp_path, str(LAUNCH / "data_prep_beam.sh"), "flink", "h:8081",
                               "vggsound", "/in", "/out", "img:1", "--clip=/c")
    assert lines[1:] == ["-m", "data_prep.build", "--dataset=vggsound", "--manual_dir=/in",
                         "--data_dir=/out", "--clip=/c",
                         "--beam_options=--runner=FlinkRunner --flink_master=h:8081 "
                         "--environment_type=DOCKER --environment_config=img:1"]


def test_slurm_and_tpu_commands(tmp_path):
    lines = run_with_stand_ins(tmp_path, str(LAUNCH / "slurm_gpu.sbatch"), "configs/x.py",
                               "/runs/x", "--config.train.batch_size=64")
    assert lines[1:] == ["--kill-on-bad-exit=1", "python3", "-m", "clipsep_jax.main",
                         "--config=configs/x.py", "--workdir=/runs/x", "--distributed=on",
                         "--config.train.batch_size=64"]
    lines = run_with_stand_ins(tmp_path, str(LAUNCH / "tpu_vm.sh"), "my-tpu", "us-z", "c.py",
                               "/w", "--config.train.num_steps=5")
    assert lines[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    remote = "\n".join(lines[8:])
    assert ("python3 -m clipsep_jax.main --config=c.py --workdir=/w --distributed=on "
            "--config.train.num_steps=5") in remote


@pytest.mark.parametrize(("env", "expected"), [
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"},
     list(range(8))),
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "1(x3)"},
     list(range(4))),
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "1"}, None),  # CPU job
    ({}, None),
])
def test_one_slurm_task_per_node_gets_every_gpu_of_the_node(monkeypatch, env, expected):
    """slurm_gpu.sbatch runs one task per node; jax alone would give it GPU SLURM_LOCALID only."""
    from clipsep_jax import sharding

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sharding.slurm_local_device_ids() == expected
