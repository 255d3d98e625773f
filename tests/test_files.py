"""Atomic writes: whole files or none, with the modes plain writes would have."""

import os
import stat

import numpy as np
import pytest

from clipsep_jax import files


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_modes_of_plain_writes(tmp_path):
    umask = current_umask()
    assert (0o666 & ~umask, 0o777 & ~umask) == (files.FILE_MODE, files.DIR_MODE)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    text = files.write_text_atomic(tmp_path / "sub" / "a.txt", "hello")
    wav = files.write_wav_atomic(tmp_path / "a.wav", np.zeros(160, np.float32), 16000)
    assert text.read_text() == "hello"
    assert mode(text) == mode(wav) == mode(plain)  # not mkstemp's private 0600
    folder = files.staging_folder(tmp_path / "model")
    (tmp_path / "mkdir").mkdir()
    assert folder.parent == tmp_path and folder.name.startswith(".model.tmp-")
    assert mode(folder) == mode(tmp_path / "mkdir")  # not mkdtemp's 0700
    assert not [p for p in tmp_path.rglob(".*") if p != folder]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = files.write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        files.write_text_atomic(target, None)  # fails inside the write
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]
