"""server/telemetry/headroom.py's sampler: readings numbered as they start, the newest kept.

Proves what elasticity's "a reading begun after the last resize" rests on: `next_seq` read at
some moment is at most the number of any reading begun later; a reading that started earlier but
finished later never replaces a newer one as `latest`; `request()` gets a reading from the
sampler's thread without waiting for its interval.
"""

from __future__ import annotations

import threading
import time

from server.telemetry.headroom import HeadroomProbe, MemorySnapshot, ProbeSampler


class GatedProbe(HeadroomProbe):
    """Each read returns a growing free count; a read can be held until the test lets it go."""

    def __init__(self) -> None:
        self.reads = 0
        self.gate: threading.Event | None = None

    def read(self) -> MemorySnapshot:
        self.reads += 1
        n = self.reads
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate.wait(5)
        return MemorySnapshot(100, 100 - n, n, 0)


def test_a_slow_older_reading_never_replaces_a_newer_one():
    probe = GatedProbe()
    sampler = ProbeSampler(probe)
    assert sampler.latest.seq == 0 and sampler.next_seq == 1
    probe.gate = threading.Event()
    gate = probe.gate
    slow = threading.Thread(target=sampler.sample)
    slow.start()  # seq 1, held inside the probe
    while sampler.next_seq < 2:
        time.sleep(0.001)
    mark = sampler.next_seq  # e.g. a resize commits now
    fresh = sampler.sample()  # seq 2: begun after the mark
    assert fresh.seq >= mark and sampler.latest is fresh
    gate.set()
    slow.join()
    assert sampler.latest is fresh  # the older reading finished last, and was not kept


def test_request_reads_now_on_the_samplers_thread():
    probe = GatedProbe()
    sampler = ProbeSampler(probe, interval_s=60.0)
    sampler.start()
    try:
        sampler.request()
        deadline = time.monotonic() + 5
        while sampler.latest.seq < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert sampler.latest.seq == 1
    finally:
        sampler.stop()
