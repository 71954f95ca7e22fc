"""Files the analysis writes are whole or absent: through elbolab.files.atomic_path, never in place."""

import os
import stat
import threading

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from elbolab.analysis import save_inference_data
from elbolab.analysis.plots import save_figure
from elbolab.files import atomic_path, atomic_write, remove_stale_temporaries


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "inference_data.nc"
    target.write_bytes(b"the old file")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_bytes(b"half of a new")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["inference_data.nc"]

    with atomic_path(target) as tmp:
        tmp.write_bytes(b"the new file")
    assert target.read_bytes() == b"the new file"
    atomic_write(target, b"written as bytes")
    assert target.read_bytes() == b"written as bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["inference_data.nc"]


def test_a_killed_writer_leaves_a_temporary_that_is_found_and_removed(tmp_path):
    target = tmp_path / "weights.safetensors"
    other = tmp_path / "history.csv"
    writing = atomic_path(target)
    tmp = writing.__enter__()  # killed here: never exits
    tmp.write_bytes(b"partial")
    other.write_bytes(b"kept")
    remove_stale_temporaries(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]


def test_save_inference_data_and_figures_that_fail_leave_the_old_files(tmp_path):
    class FailingInferenceData:
        def to_netcdf(self, filename):
            with open(filename, "wb") as handle:
                handle.write(b"CDF half")
            raise OSError("disk full (simulated)")

    nc = tmp_path / "inference_data.nc"
    nc.write_bytes(b"old netcdf")
    with pytest.raises(OSError, match="disk full"):
        save_inference_data(FailingInferenceData(), nc)
    assert nc.read_bytes() == b"old netcdf"

    png = tmp_path / "khat.png"
    png.write_bytes(b"old figure")
    fig, _ = plt.subplots()

    def failing_savefig(fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError("disk full (simulated)")

    fig.savefig = failing_savefig
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, png)
    assert png.read_bytes() == b"old figure"
    assert not plt.fignum_exists(fig.number)  # freed also on failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference_data.nc", "khat.png"]


def test_figures_take_the_format_of_their_name(tmp_path):
    for name, magic in [("a.png", b"\x89PNG"), ("b.svg", b"<?xml"), ("c.pdf", b"%PDF")]:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        assert save_figure(fig, tmp_path / name) == tmp_path / name
        assert (tmp_path / name).read_bytes().startswith(magic), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.svg", "c.pdf"]


def test_a_written_file_has_the_mode_a_new_file_gets(tmp_path):
    """The temporary file's 0600 must not outlive the rename: figures and tables are for others to read."""
    mask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "table.csv", b"a,b\n")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "table.csv").stat().st_mode) == 0o640


def test_a_file_that_is_not_a_regular_file_is_written_in_place(tmp_path):
    """``elbolab sample --out /dev/stdout``: a device or a pipe is written to, never renamed over."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    atomic_write(pipe, b"a,b\n")
    reader.join(timeout=10)
    assert received == [b"a,b\n"] and stat.S_ISFIFO(pipe.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
