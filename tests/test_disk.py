"""LocalDisk: the splitter's reads and writes of the protected disk, on a real file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbd_plugin.disk import LocalDisk

MiB = 1024 * 1024


def test_read_returns_what_was_written_and_fails_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(2 * MiB))
    disk = LocalDisk(str(path))
    data = os.urandom(MiB + 7)
    disk.pwrite(data, 4096)
    assert disk.read(4096, len(data)) == data
    assert disk.read(0, 4096) == bytes(4096)
    with pytest.raises(OSError):
        disk.read(2 * MiB - 10, 20)  # a short read that cannot be completed
    disk.close()


@pytest.mark.parametrize("length", [1, 4096, MiB - 1, MiB, 3 * MiB])
def test_all_zero(length: int) -> None:
    assert LocalDisk.all_zero(bytes(length))
    for at in (0, length // 2, length - 1):
        data = bytearray(length)
        data[at] = 1
        assert not LocalDisk.all_zero(bytes(data))
