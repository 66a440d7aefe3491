"""Host files handed to the sandbox (`files=` paths) are copied as regular files only, never through a symlink."""

import os

import pytest

from synth.sandbox import run_python

READ_IT = "print(open('data.txt').read())"


def test_a_regular_host_file_is_copied_in(tmp_path):
    (tmp_path / "data.txt").write_text("inside")
    result = run_python(READ_IT, files={"data.txt": tmp_path / "data.txt"}, allow_unisolated=True)
    assert result.stdout == "inside\n" and result.returncode == 0


@pytest.mark.parametrize("target", ["secret.txt", "/etc/passwd", "missing.txt"])
def test_a_symlinked_host_file_is_refused(tmp_path, target):
    (tmp_path / "secret.txt").write_text("host secret")
    link = tmp_path / "data.txt"
    link.symlink_to(tmp_path / target if not target.startswith("/") else target)
    with pytest.raises(ValueError, match=r"files: 'data.txt': .*data.txt is a symlink"):
        run_python(READ_IT, files={"data.txt": link}, allow_unisolated=True)


def test_a_fifo_or_a_dir_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="fifo is not a regular file"):
        run_python(READ_IT, files={"data.txt": tmp_path / "fifo"}, allow_unisolated=True)
    with pytest.raises(ValueError, match="is not a regular file"):
        run_python(READ_IT, files={"data.txt": tmp_path}, allow_unisolated=True)
