"""The journal record header: one per record in a segment file ``seg-<n>.fjr``.

Each record is this 48-byte header and, for the kinds in ``records.DATA_KINDS``, ``length``
bytes of data::

    offset  size  field
    0       4     magic     b"FJR\\x01"
    4       1     kind      records.KIND_*
    5       1     flags     records.FLAG_*
    6       2     disk      index of the disk in its group
    8       4     gen       splitter generation
    12      4     length    bytes of the change (data follows only for DATA_KINDS)
    16      8     seq       sequence number within the generation
    24      8     offset    byte offset on the disk
    32      8     time_ns   source CLOCK_MONOTONIC when the write completed
    40      8     checksum  xxh3_64 of bytes 0..39 and the data

Integers are little-endian. The agent writes and checks records (``agent/target/journal.py``);
the view plugin reads headers and data at positions the index gives (``jindex.py``) and checks
a record's checksum before it returns its data (``jmap.Reader``).
"""

from __future__ import annotations

import struct

MAGIC = b"FJR\x01"
RECORD = struct.Struct("<4sBBHIIQQQQ")
assert RECORD.size == 48
CHECKED = 40  # header bytes covered by the checksum (with the data)
