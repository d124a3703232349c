"""The benchmarks' own arithmetic, on hand-made inputs with known answers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gloo_primitives  # noqa: E402
import memory_peak  # noqa: E402
import torch  # noqa: E402

from fsdp_compile.testing.spawn import run_ranks  # noqa: E402

MiB = 2**20


def test_memory_peak_matches_each_free_to_its_allocation_and_reports_the_blocks_live_at_the_peak():
    ms = 1_000_000  # ns
    allocations = [
        (0 * ms, 0xA, 4 * MiB, ("forward", "aten::mm")),
        (1 * ms, 0xB, 8 * MiB, ("backward", "fsdp_compile::all_gather_copy_out_fused", "aten::empty")),
        (2 * ms, 0xA, -4 * MiB, ()),
        (3 * ms, 0xA, 3 * MiB, ("backward", "aten::mm")),  # the same address again: a new block
        (4 * ms, 0xB, -8 * MiB, ()),
        (5 * ms, 0xC, 1 * MiB, ("optimizer", "aten::sqrt")),
    ]
    # running sum: 4, 12 (the peak, at 1 ms: blocks A and B), 8, 11, 3, 4
    report = memory_peak.analyse(allocations, depth=2, big_mib=5.0).splitlines()
    assert report[0] == "peak growth 12.0 MiB at 1 ms of the step; live then, by allocating op:"
    assert report[1] == "     8.00 MiB in   1 blocks  backward: fsdp_compile::all_gather_copy_out_fused / aten::empty"
    assert report[2] == "        MiB@ms: 8.00@1"
    assert report[3] == "     4.00 MiB in   1 blocks  forward: forward / aten::mm"
    assert report[5] == "blocks of 5 MiB or more, allocated -> freed (ms; '-': still live at the step's end):"
    assert report[6:] == ["       1 ->      4    8.00 MiB  backward: fsdp_compile::all_gather_copy_out_fused / aten::empty"]


def test_gloo_primitives_send_recv_gather_matches_the_functional_all_gather():
    """The benchmark's send/recv variant gathers exactly what the functional op does."""
    sizes = [1, 5, 70_000]
    for got in run_ranks(gloo_primitives.gathered_both_ways, 2, sizes, timeout=120):
        for n in sizes:
            want = torch.cat([torch.arange(n, dtype=torch.float32) + 1000 * r for r in range(2)])
            assert torch.equal(got["functional", n], want), n
            assert torch.equal(got["send/recv", n], want), n
