"""glibc mmap threshold: freed tensors go back to the operating system."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys, torch
from crlnseg.train.allocator import release_freed_memory, wanted
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
print(int(wanted(False) and release_freed_memory()))
torch.ones(2 << 20).sum()  # free one 8 MB block: glibc raises its threshold above 4 MB
before = rss()
blocks = []
for _ in range(64):  # 64 x 4 MB, each followed by a small survivor that pins the heap
    blocks.append((torch.ones(1 << 20), torch.ones(1000)))
peak = rss()
blocks = [small for _, small in blocks]
print(round(peak - before), round(rss() - before))
"""


def probe(env: dict[str, str]) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0] == "1", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_tensors_are_returned_only_with_the_fixed_threshold() -> None:
    on, peak_on, kept_on = probe({"CRLNSEG_GLIBC_MMAP": "1"})
    off, peak_off, kept_off = probe({"CRLNSEG_GLIBC_MMAP": "0"})
    if not on:
        pytest.skip("C library without mallopt")
    assert not off
    assert peak_on > 200 and peak_off > 200  # 256 MB were resident at the peak
    assert kept_on < 30  # returned on free
    assert kept_off > 200  # glibc's default keeps the fragmented heap


def test_only_the_memory_mode_wants_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from crlnseg.train.allocator import wanted

    monkeypatch.delenv("CRLNSEG_GLIBC_MMAP", raising=False)
    assert wanted(True) and not wanted(False)
    monkeypatch.setenv("CRLNSEG_GLIBC_MMAP", "0")
    assert not wanted(True)
    monkeypatch.setenv("CRLNSEG_GLIBC_MMAP", "1")
    assert wanted(False)
