"""The benchmarks' own arithmetic, on hand-made inputs with known answers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cpu_by_thread  # noqa: E402
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


def test_gloo_primitives_send_recv_and_broadcast_gathers_match_the_functional_all_gather():
    """The benchmark's send/recv and broadcast variants gather exactly what the functional op does."""
    sizes = [1, 5, 70_000]
    for got in run_ranks(gloo_primitives.gathered_every_way, 2, sizes, timeout=120):
        assert sorted({variant for variant, _ in got}) == ["broadcasts", "functional", "send/recv"]
        for n in sizes:
            want = torch.cat([torch.arange(n, dtype=torch.float32) + 1000 * r for r in range(2)])
            for variant in ("functional", "send/recv", "broadcasts"):
                assert torch.equal(got[variant, n], want), (variant, n)


def test_cpu_by_thread_charges_each_sample_to_its_thread_and_the_kind_of_its_function():
    """One sample per ``perf script -F comm,ip,sym`` line, in ms per rank per step (999 Hz)."""
    script = "\n".join([
        "          python      7f0b mkl_blas_avx512_sgemm_kernel_0",
        "          python      7f0c mkl_blas_avx512_sgemm_kernel_0_b0",
        "      python3.11      7f0d gc_collect_main",
        " pt_gloo_runloop      7f0e c10::function_ref<void (char**, long const*, long, long)>::callback_fn<at::native::AVX2::direct_copy_kernel>",
        "   gloo_tcp_loop  ffffffff _copy_to_iter",
        "   gloo_tcp_loop  ffffffff exc_page_fault",
        "       kdamond.0  ffffffff damon_something",
        "          python      7f0f",
    ])
    got = cpu_by_thread.tally(script, steps=2, ranks=2)
    ms = 1e3 / 999 / 4
    assert got == {
        ("main", "matmul"): 2 * ms,
        ("main", "python gc"): ms,
        ("main", "other"): ms,
        ("pt_gloo_runloop", "copies"): ms,
        ("gloo_tcp_loop", "socket copies"): ms,
        ("gloo_tcp_loop", "page faults"): ms,
        ("other threads", "other"): ms,
    }


def test_copy_kernels_per_call_times_the_same_copy_three_ways():
    import copy_kernels

    for _ in range(2):  # a second run in one process reuses the custom_op twins
        # per_call first checks every way's output against torch.chunk's rank-major layout
        rows = copy_kernels.per_call(rounds=1, calls=3)
        assert [r["op"] for r in rows] == ["all_gather_copy_out", "all_gather_copy_in", "reduce_scatter_copy_in"]
        assert all(set(r) == {"op", "custom_op", "library op (ours)", "body alone"} for r in rows)
        assert all(r[way] > 0 for r in rows for way in ("custom_op", "library op (ours)", "body alone"))
