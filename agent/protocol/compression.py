"""Which BATCH bodies the source compresses, and at which zstd level (adaptive compression).

Promise: a body is sent compressed only when that saved at least ``MIN_GAIN`` of it; every
other body goes as it is (``flags = 0``), which every receiver has always taken. What a
``Policy`` decides changes the bytes on the wire, never what the target applies.

Modes, from ``FERRY_COMPRESSION`` in the source agent's environment (``mode_from_env``):

- ``auto`` (the default): a body of ``MIN_BODY`` bytes or less goes as it is. For a larger
  one, a sample of it (``SAMPLE_PIECES`` pieces of ``SAMPLE_PIECE`` bytes spread across it)
  is compressed first: a sample that does not shrink by ``MIN_GAIN`` sends the body as it
  is without compressing the rest (encrypted or random data costs a sample, not a core).
  Every ``BACKOFF``-th such body is compressed whole anyway: small pieces cannot see
  redundancy that lies far apart (a block written twice in one batch); when that check
  pays, the next ``DISTRUST`` bodies are compressed whole without sampling.
  Otherwise the whole body is compressed, at a level chosen by how fast the link drains
  against how fast zstd runs on this CPU (``level``): a slow link (bandwidth-limited, a
  WAN) gets a stronger level. (A faster, negative level for a link that outruns zstd was
  tried and left out: on fio's data at 64 KiB it sent 0.25 of the bytes instead of 0.15
  and saved agent A no CPU, bench/cost_split.py, 2026-12-05.)
  Compressible data is never sent uncompressed only because the link is fast: the
  write-stream anomaly alert (agent/alerts.py) reads the ratio of frame bytes to write
  bytes, and must keep seeing compressible writes compress.
- ``zstd``: the policy before ``auto``: try level 1 on every body over ``MIN_BODY``; after
  one that saved less than ``MIN_GAIN``, send the next ``BACKOFF`` bodies as they are.
- ``off``: never compress.

The policy is plain logic; ``frames.Codec`` compresses and measures, and the shipper tells
it how long each frame took to leave (``link``).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import zstandard

log = logging.getLogger("ferry.wire")

MIN_BODY = 512
MIN_GAIN = 0.10
BACKOFF = 16
SAMPLE_PIECES = 8
SAMPLE_PIECE = 4096
LEVEL = 1          # the level while nothing is measured yet
LEVEL_SLOW = 3     # the link is SLOW_LINK times slower than zstd at LEVEL
SLOW_LINK = 32.0
DISTRUST = 64      # bodies compressed whole after a sample was proven wrong
DECAY = 0.8        # weight of the past in the throughput estimates, per observation
MODES = ("auto", "zstd", "off")


def mode_from_env(environ: Optional[Dict[str, str]] = None) -> str:
    """``FERRY_COMPRESSION`` (auto, zstd or off); an unknown value is logged and ``auto``."""
    value = (os.environ if environ is None else environ).get("FERRY_COMPRESSION", "auto")
    if value not in MODES:
        log.warning("FERRY_COMPRESSION=%r is not one of %s: compression is auto",
                    value, ", ".join(MODES))
        return "auto"
    return value


class Rate:
    """Bytes per second over recent observations (older ones weigh less)."""

    def __init__(self) -> None:
        self.nbytes = 0.0
        self.seconds = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.nbytes = self.nbytes * DECAY + nbytes
        self.seconds = self.seconds * DECAY + max(0.0, seconds)

    @property
    def value(self) -> Optional[float]:
        """None until something took measurable time."""
        return self.nbytes / self.seconds if self.seconds > 1e-6 else None


class Policy:
    """Decides, frame by frame, whether and how hard to compress (see the module)."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError("compression mode %r is not one of %s" % (mode, ", ".join(MODES)))
        self.mode = mode
        self._skip = 0
        self._checks = 0              # bodies sent as they are since the last check
        self._checking = False        # the body being compressed is such a check
        self._trust_sample = 0        # bodies to compress whole without sampling
        self._sampler = zstandard.ZstdCompressor(level=LEVEL)
        self.link_rate = Rate()       # batch bytes per second spent sending their frames
        self.zstd_rate = Rate()       # body bytes per CPU second spent compressing at LEVEL
        self.sampled_out = 0          # bodies sent as they are on the sample's word

    def level_for(self, body: memoryview) -> Optional[int]:
        """The zstd level to compress ``body`` at, or None to send it as it is."""
        if self.mode == "off" or len(body) <= MIN_BODY:
            return None
        if self.mode == "zstd":
            if self._skip:
                self._skip -= 1
                return None
            return LEVEL
        if self._trust_sample:
            self._trust_sample -= 1
            return self.level()
        sample = take_sample(body)
        if sample is not None and len(self._sampler.compress(sample)) > \
                len(sample) * (1 - MIN_GAIN):
            self._checks += 1
            if self._checks < BACKOFF:
                self.sampled_out += 1
                return None
            # Now and then the whole body anyway: small pieces miss redundancy that is
            # far apart (a block written twice in one batch); ``compressed`` learns.
            self._checks = 0
            self._checking = True
        return self.level()

    def level(self) -> int:
        link, zstd = self.link_rate.value, self.zstd_rate.value
        if link is None or zstd is None:
            return LEVEL
        if link * SLOW_LINK < zstd:
            return LEVEL_SLOW
        return LEVEL

    def compressed(self, level: int, raw: int, packed: int, cpu_seconds: float) -> bool:
        """A body of ``raw`` bytes became ``packed`` at ``level`` in ``cpu_seconds``: is the
        compressed form worth sending?"""
        if level == LEVEL:
            self.zstd_rate.add(raw, cpu_seconds)
        good = packed <= raw * (1 - MIN_GAIN)
        if not good and self.mode == "zstd":
            self._skip = BACKOFF
        if self._checking and good:
            self._trust_sample = DISTRUST  # the sample was wrong about this stream
        self._checking = False
        return good

    def sent(self, nbytes: int, seconds: float) -> None:
        """A frame of ``nbytes`` of records (as they were before compression: the rate is
        compared with zstd's) took ``seconds`` to leave (bandwidth limit included)."""
        self.link_rate.add(nbytes, seconds)


def take_sample(body: memoryview) -> Optional[bytes]:
    """``SAMPLE_PIECES`` pieces spread evenly across ``body``; None when the body is not
    much larger than the sample (then the whole of it is tried)."""
    n = len(body)
    if n < 4 * SAMPLE_PIECES * SAMPLE_PIECE:
        return None
    step = n // SAMPLE_PIECES
    return b"".join(body[i * step:i * step + SAMPLE_PIECE] for i in range(SAMPLE_PIECES))

