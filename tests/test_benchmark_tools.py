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


def _result(name, **over):
    r = {
        "name": name, "status": "ok", "first_step_s": 1.5, "median_step_ms": 20.0, "median_cpu_ms": 18.25,
        "peak_step_mem_bytes": 2 * MiB, "peak_step_mem_bytes_each": [2 * MiB, 3 * MiB], "steady_bytes": 100 * MiB,
        "total_bytes": 102 * MiB, "state_bytes": {"total": 6 * MiB}, "collectives_per_step": 3,
        "collectives_by_kind": {"ag": 2, "rs": 1}, "dynamo": None, "final_loss": 4.5, "median_sys_ms": 1.0,
        "median_page_faults": 10, "phases_ms": {"forward": 5.0, "backward": 10.0, "optimizer": 2.0,
                                                "compute": 12.0, "collective": 2.0, "copy": 1.0},
    }
    r.update(over)
    return r


def test_step_report_prints_each_system_and_why_one_did_not_run():
    import report

    text = report.text([
        _result("fsdp_compile_eager", ratio_vs_ddp_compile={"median": 1.25, "min": 1.0, "max": 1.5}),
        {"name": "simplefsdp_compile", "status": "skipped", "reason": "torchtitan SimpleFSDP not importable"},
    ]).splitlines()
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    assert cells(text[0])[:4] == ["config", "status", "first step s", "median ms"]
    assert cells(text[2]) == [
        "fsdp_compile_eager", "ok", "1.50", "20.0", "1.250 (1.000-1.500)", "18.2", "2.00 (2.00-3.00)", "100.00",
        "102.00", "6.00", "3 = 2 ag + 1 rs", "-", "4.50000", "-"]
    assert cells(text[3])[:3] == ["simplefsdp_compile", "skipped", "-"]
    assert text[-1] == "simplefsdp_compile: skipped: torchtitan SimpleFSDP not importable"
    # fsdp_compile_eager has no phase breakdown (systems.SYSTEMS[...].breakdown): no phase table
    assert not any(line.startswith("| config (ms per step)") for line in text)


def test_every_step_system_is_one_table_entry_and_the_cli_rejects_others():
    import step
    import systems

    assert list(systems.SYSTEMS)[:2] == ["ddp", "ddp_compile"]
    assert all(callable(s.build) and s.doc for s in systems.SYSTEMS.values())
    assert [n for n, s in systems.SYSTEMS.items() if s.from_baseline] == ["fsdp_compile_baseline"]
    try:
        step.main(["--only", "ddp,no_such_system"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("step.py accepted an unknown system")
    assert {n: s.tp for n, s in systems.SYSTEMS.items() if s.tp > 1} == {"fsdp2_tp2": 2, "fsdp_compile_tp2": 2}
    try:  # a tensor-parallel system needs a world that is a multiple of its tp size
        step.main(["--only", "fsdp_compile_tp2", "--world", "3"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("step.py accepted --world 3 for a tp 2 system")


def test_the_native_reduce_scatter_lever_sets_every_unit_and_rejects_other_kinds():
    import pytest

    import fsdp_compile
    from fsdp_compile.testing.levers import set_reduce_scatter

    model = fsdp_compile.fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                                     policy={torch.nn.Linear})
    set_reduce_scatter(model, "native")
    assert [u.spec.reduce_scatter for u in fsdp_compile.sharding_info(model).units] == ["native"] * 2
    set_reduce_scatter(model, "all_to_all")
    assert [u.spec.reduce_scatter for u in fsdp_compile.sharding_info(model).units] == ["all_to_all"] * 2
    with pytest.raises(ValueError, match="kind must be one of"):
        set_reduce_scatter(model, "ring")


def test_compile_forms_table_compares_each_form_with_ddp_compiled_the_same_way():
    import compile_forms
    import systems

    assert set(compile_forms.SYSTEMS) <= set(systems.SYSTEMS)
    point = lambda system, ms, graphs=1: {  # noqa: E731
        "system": system, "layers": 4, "status": "ok", "first_step_s": 12.0, "median_step_ms": ms,
        "graphs": graphs, "final_loss": 1.0, "reason": None}
    text = compile_forms.table([
        point("ddp_compile", 10.0), point("ddp_per_block", 20.0), point("fsdp_compile", 25.0, graphs=2),
        point("fsdp_compile_per_block", 30.0),
        {"system": "fsdp2_per_block", "layers": 4, "status": "failed", "first_step_s": None,
         "median_step_ms": None, "graphs": None, "final_loss": None, "reason": "boom"},
    ]).splitlines()
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    assert cells(text[4]) == ["fsdp_compile", "4", "12.0", "25.0", "2", "2.50"]  # over ddp_compile
    assert cells(text[5]) == ["fsdp_compile_per_block", "4", "12.0", "30.0", "1", "1.50"]  # over ddp_per_block
    assert cells(text[6]) == ["fsdp2_per_block", "4", "failed", "boom", "-", "-"]


def test_step_cli_takes_a_layers_by_dim_gpt_and_rejects_other_model_names():
    import step

    assert step._model_name("L16xD256") == "L16xD256"
    assert step._model_name("8x512") == "8x512"
    for bad in ("L0xD256", "16x256", "llama"):
        try:
            step._model_name(bad)
        except Exception as e:  # argparse.ArgumentTypeError
            assert bad in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")
