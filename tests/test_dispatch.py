"""The dispatch logic (no GPU needed): plans from tables, the rule for GPUs without one, table lookup."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_int4 import dispatch
from hf_int4.cli import main as cli_main

F16, BF16 = torch.float16, torch.bfloat16


def spec(K=4096, N=4096, gs=128, sym=True, act=False, dtype=F16):
    return dispatch.LinearSpec(K, N, gs, sym, act, dtype)


def entry(k, n, m, decode, dequant, dtype="float16"):
    return {"k": k, "n": n, "dtype": dtype, "m": m, "us": {"decode": decode, "dequant": dequant}}


def test_plan_serves_each_m_with_the_path_fastest_at_the_grid_point_at_or_above_it():
    table = {"entries": [entry(4096, 4096, [1, 16, 128, 192, 1024], [5, 6, 30, 40, 400], [50, 50, 31, 39, 300])]}
    plan = dispatch.plan_from_table(table, spec(), "t")
    assert plan.steps == ((1, "decode"), (129, "dequant"))
    assert [plan.path_name(m) for m in (1, 16, 128, 129, 191, 192, 10**6)] == ["decode"] * 3 + ["dequant"] * 4
    assert "decode for M 1..128, dequant for M 129.." in plan.describe()


def test_plan_can_switch_back_and_forth():
    table = {"entries": [entry(64, 64, [1, 8, 64], [1, 9, 1], [5, 5, 5])]}
    plan = dispatch.plan_from_table(table, spec(64, 64), "t")
    assert plan.steps == ((1, "decode"), (2, "dequant"), (9, "decode"))
    assert [plan.path_name(m) for m in (1, 2, 8, 9, 64, 65)] == ["decode", "dequant", "dequant", "decode", "decode",
                                                                "decode"]


def test_a_path_not_timed_at_some_m_is_never_planned_there():
    # a path with max_m has null beyond it in tuned tables (here at M = 128 and 256): the plan must not pick it
    # there, and must say so when nothing else was timed
    table = {"entries": [entry(4096, 4096, [1, 16, 128, 256], [5, 9, 40, 80], [50, 50, 30, 20])]}
    table["entries"][0]["us"]["hopper_w256_t32_partials2"] = [9, 4, None, None]
    plan = dispatch.plan_from_table(table, spec(), "t")
    assert plan.steps == ((1, "decode"), (2, "hopper_w256_t32_partials2"), (17, "dequant"))
    table["entries"][0]["us"] = {"hopper_w256_t32_partials2": [9, 4, None, None]}
    with pytest.raises(ValueError, match="no usable path was timed at M = 128"):
        dispatch.plan_from_table(table, spec(), "t")


def test_unmeasured_shape_uses_the_entry_closest_in_weight_size_and_dtype():
    table = {"entries": [
        entry(4096, 4096, [1, 128, 256], [1, 2, 9], [5, 5, 5]),       # 16M weights: dequant from 129
        entry(8192, 8192, [1, 256, 512], [1, 2, 9], [5, 5, 5]),       # 64M weights: dequant from 257
        entry(8192, 8192, [1, 32, 64], [1, 2, 9], [5, 5, 5], "bfloat16"),
    ]}
    assert dispatch.plan_from_table(table, spec(4096, 6144), "t").steps[1][0] == 129
    assert dispatch.plan_from_table(table, spec(8192, 28672), "t").steps[1][0] == 257
    assert dispatch.plan_from_table(table, spec(8192, 8192, dtype=BF16), "t").steps[1][0] == 33
    assert "entry 8192x8192 bfloat16" in dispatch.plan_from_table(table, spec(8192, 8192, dtype=BF16), "t").source


def test_paths_that_cannot_run_a_layer_are_never_planned(monkeypatch):
    class NoAsym(dispatch.DequantCublasPath):
        def unsupported(self, s):
            return super().unsupported(s) or ("no zero points" if not s.sym else None)

    monkeypatch.setitem(dispatch.PATHS, "dequant", NoAsym())
    table = {"entries": [entry(4096, 4096, [1, 256], [1, 9], [5, 5])]}
    assert dispatch.plan_from_table(table, spec(sym=True), "t").steps == ((1, "decode"), (2, "dequant"))
    assert dispatch.plan_from_table(table, spec(sym=False), "t").steps == ((1, "decode"),)
    assert dispatch.PATHS["decode"].unsupported(spec(dtype=torch.float32)) is not None
    with pytest.raises(ValueError, match="no measured path"):
        dispatch.plan_from_table(table, spec(dtype=torch.float32), "t")


def test_paths_this_gpu_lacks_are_left_out_of_the_plan():
    table = {"entries": [{"k": 4096, "n": 4096, "dtype": "float16", "m": [1, 256, 512],
                          "us": {"decode": [1, 9, 20], "dequant": [5, 8, 10], "hopper": [7, 6, 5]}}]}
    assert dispatch.plan_from_table(table, spec(), "t").steps == ((1, "decode"), (2, "hopper"))
    assert dispatch.plan_from_table(table, spec(), "t", ["decode", "dequant"]).steps == ((1, "decode"), (2, "dequant"))
    assert dispatch.PATHS["hopper"].device_unsupported(props(108, 1, 1, 1, major=8)).startswith("needs sm_90")


def test_asymmetric_layers_plan_only_the_hopper_schedules_built_with_zero_points():
    table = {"entries": [{"k": 4096, "n": 4096, "dtype": "float16", "m": [1, 256, 512, 1024],
                          "us": {"decode": [1, 9, 20, 40], "dequant": [5, 8, 10, 20], "hopper": [7, 7, 9, 15],
                                 "hopper_192": [7, 6, 5, 16]}}]}
    assert dispatch.plan_from_table(table, spec(), "t").steps == ((1, "decode"), (2, "hopper_192"), (513, "hopper"))
    assert dispatch.plan_from_table(table, spec(sym=False), "t").steps == ((1, "decode"), (2, "hopper"))
    assert "built without them" in dispatch.PATHS["hopper_192"].unsupported(spec(sym=False))
    assert dispatch.PATHS["hopper"].unsupported(spec(sym=False)) is None


def props(sms, clock_khz, mem_khz, bus_bits, major=9, minor=0, name="GPU"):
    return SimpleNamespace(multi_processor_count=sms, clock_rate=clock_khz, memory_clock_rate=mem_khz,
                           memory_bus_width=bus_bits, major=major, minor=minor, name=name)


def test_rule_crossover_grows_with_the_flop_per_byte_ratio():
    h100 = dispatch.rule_crossover(props(132, 1_980_000, 2_619_000, 5120))
    a100 = dispatch.rule_crossover(props(108, 1_410_000, 1_593_000, 5120, major=8))
    slow_memory = dispatch.rule_crossover(props(132, 1_980_000, 1_000_000, 2048))
    assert 32 <= a100 <= h100 <= slow_memory <= 1024
    assert a100 < slow_memory
    assert h100 & (h100 - 1) == 0, "a power of two"


def test_user_table_takes_precedence_over_the_shipped_one(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(dispatch, "SHIPPED_TABLES", shipped)
    monkeypatch.setenv("HF_INT4_CACHE", str(tmp_path / "cache"))
    name = "NVIDIA Test GPU 80GB"
    assert dispatch.table_path_for(name) is None
    (shipped / "nvidia_test_gpu_80gb.json").write_text("{}")
    assert dispatch.table_path_for(name) == shipped / "nvidia_test_gpu_80gb.json"
    user = dispatch.user_table_dir() / "nvidia_test_gpu_80gb.json"
    user.parent.mkdir(parents=True)
    user.write_text("{}")
    assert dispatch.table_path_for(name) == user


def test_shipped_tables_are_complete():
    tables = sorted(dispatch.SHIPPED_TABLES.glob("*.json"))
    assert tables, "hf_int4/tables ships at least the H100 table"
    for path in tables:
        table = json.loads(path.read_text())
        assert dispatch.device_slug(table["device"]) == path.stem
        for e in table["entries"]:
            assert set(e["us"]) <= set(dispatch.PATHS) and e["m"] == sorted(e["m"]) and e["m"][0] == 1
            # null where the path's max_m says it is not timed, and where a path added later was not
            # (tune.merge_entries); the paths timed at every M up to their max_m include the first three
            timed_throughout = set()
            for name, times in e["us"].items():
                max_m = dispatch.PATHS[name].max_m
                assert len(times) == len(e["m"]), path
                in_range = [t for m, t in zip(e["m"], times) if max_m is None or m <= max_m]
                assert all(t is None for t in times[len(in_range):]), (path, name)  # e["m"] ascends
                assert any(t is not None for t in times) and all(t > 0 for t in times if t is not None), (path, name)
                if None not in in_range:
                    timed_throughout.add(name)
            assert {"decode", "dequant", "hopper"} <= timed_throughout, (path, e["k"], e["n"], e["dtype"])
        for K, N in [(576, 1536), (4096, 4096), (8192, 28672)]:
            plan = dispatch.plan_from_table(table, spec(K, N), path.name)
            assert plan.steps[0] == (1, "decode"), plan.describe()


def test_plan_for_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="device cpu"):
        dispatch.plan_for(spec(), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_tune_needs_a_gpu(capsys):
    assert cli_main(["tune", "--shapes", "64x64"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_tune_keeps_the_entries_it_did_not_measure():
    from hf_int4.tune import merge_tables

    def table(device, measured, *entries):
        return {"device": device, "measured": measured, "entries": [dict(e, group_size=128) for e in entries]}

    previous = table("GPU A", "2026-01-01",
                     entry(4096, 4096, [1, 256], [1, 9], [5, 5]),  # re-measured below at other Ms: merged
                     entry(4096, 4096, [1, 32, 64], [1, 2, 9], [5, 5, 5], "bfloat16"),  # other dtype: kept
                     dict(entry(8192, 8192, [1, 512], [1, 9], [5, 5]), measured="2025-12-31"))  # other shape: kept
    fresh = table("GPU A", "2026-02-02", entry(4096, 4096, [1, 64, 128], [1, 2, 9], [5, 5, 5]))
    merged = merge_tables(dict(previous, note="written by hand"), fresh)
    assert merged["measured"] == "2026-02-02"
    assert merged["note"] == "written by hand"
    got = {(e["n"], e["dtype"]): e for e in merged["entries"]}
    assert sorted(got) == [(4096, "bfloat16"), (4096, "float16"), (8192, "float16")]
    assert got[(4096, "float16")]["m"] == [1, 64, 128, 256]
    assert got[(4096, "float16")]["us"] == {"decode": [1, 2, 9, 9], "dequant": [5, 5, 5, 5]}  # M = 1: the new time
    assert got[(4096, "bfloat16")]["measured"] == "2026-01-01"
    assert got[(8192, "float16")]["measured"] == "2025-12-31"
    assert dispatch.plan_from_table(merged, spec(), "t").steps == ((1, "decode"), (65, "dequant"))
    assert dispatch.plan_from_table(merged, spec(dtype=BF16), "t").steps == ((1, "decode"), (33, "dequant"))
    # another GPU model's table contributes nothing
    assert merge_tables(dict(previous, device="GPU B"), fresh) == fresh
    # a path new since the old entry: merged, not timed (null) at the old Ms, so never planned there
    fresh["entries"][0]["us"]["hopper"] = [3, 3, 3]
    got = {(e["n"], e["dtype"]): e for e in merge_tables(previous, fresh)["entries"]}
    assert got[(4096, "float16")]["m"] == [1, 64, 128, 256]
    assert got[(4096, "float16")]["us"]["hopper"] == [3, 3, 3, None]
    plan = dispatch.plan_from_table({"entries": [got[(4096, "float16")]]}, spec(), "t")
    assert plan.steps == ((1, "decode"), (65, "hopper"), (129, "dequant"))  # 129..256: old times, hopper untimed
    # an entry that lost a path is replaced: the old Ms would compare that path against paths no longer timed
    del fresh["entries"][0]["us"]["decode"]
    got = {(e["n"], e["dtype"]): e for e in merge_tables(previous, fresh)["entries"]}
    assert got[(4096, "float16")]["m"] == [1, 64, 128]


def test_a_layer_takes_its_own_variants_entry_where_its_shape_has_one():
    """Entries of one shape measured on symmetric and asymmetric weights (`hf-int4 tune --asym`) or at another group
    size: each layer takes its own; a shape measured only in the other variant still beats a farther shape."""
    crossing_at = {65: [1, 64, 128], 129: [1, 128, 256]}
    sym_4k = dict(entry(4096, 4096, crossing_at[65], [1, 2, 9], [5, 5, 5]), group_size=128)  # no "sym": symmetric
    asym_4k = dict(entry(4096, 4096, crossing_at[129], [1, 2, 9], [5, 5, 5]), group_size=128, sym=False)
    g64_4k = dict(entry(4096, 4096, [1, 32, 64], [1, 2, 9], [5, 5, 5]), group_size=64, sym=True)
    sym_8k = dict(entry(8192, 8192, [1, 512, 1024], [1, 2, 9], [5, 5, 5]), group_size=128)
    for entries in ([sym_4k, asym_4k, g64_4k, sym_8k], [sym_8k, g64_4k, asym_4k, sym_4k]):  # order does not matter
        table = {"entries": entries}
        assert dispatch.plan_from_table(table, spec(), "t").steps == ((1, "decode"), (65, "dequant"))
        assert dispatch.plan_from_table(table, spec(sym=False), "t").steps == ((1, "decode"), (129, "dequant"))
        assert dispatch.plan_from_table(table, spec(gs=64), "t").steps == ((1, "decode"), (33, "dequant"))
        asym_8k = dispatch.plan_from_table(table, spec(8192, 8192, sym=False), "t")
        assert asym_8k.steps == ((1, "decode"), (513, "dequant"))
    # tune keeps both variants of a shape: they are different entries
    from hf_int4.tune import merge_tables

    merged = merge_tables({"device": "G", "entries": [sym_4k]}, {"device": "G", "entries": [asym_4k]})
    assert sorted(e.get("sym", True) for e in merged["entries"]) == [False, True]


def test_the_hopper_paths_match_the_schedules_the_op_knows():
    """dispatch's schedule numbers, partial-sum and zero-point sets against hopper_gemm.h (kHopperSchedules,
    kPartialSchedules, kZeroPointSchedules): a schedule the op reads as data-parallel while dispatch passes splits
    would be refused on the GPU only."""
    header = (Path(dispatch.__file__).parent / "csrc" / "hopper" / "hopper_gemm.h").read_text()
    count = int(re.search(r"kHopperSchedules = (\d+);", header).group(1))

    def bits(mask_pattern):
        return sorted(int(bit) for bit in re.findall(r"1u << (\d+)", re.search(mask_pattern, header).group(1)))

    assert bits(r"kPartialSchedules = ([^;]+);") == sorted(dispatch.PARTIAL_SUM_SCHEDULES)
    assert bits(r"kZeroPointSchedules =\s*([^;]+);") == sorted(dispatch.ZERO_POINT_SCHEDULES)
    hopper = [p for p in dispatch.PATHS.values() if isinstance(p, dispatch.HopperPath)]
    assert {p.schedule for p in hopper} == set(range(count))  # every configuration reachable, none beyond the op's
    assert all((p.splits >= 2) == (p.schedule in dispatch.PARTIAL_SUM_SCHEDULES) for p in hopper)


def test_beyond_the_last_grid_point_a_path_is_never_planned_past_its_max_m():
    # a table tuned only at small M (`hf-int4 tune --ms 1,8,16`): the 16-token tiles win at 16, the last point, but
    # have max_m = 16; from M = 17 on, the fastest path at 16 that has no max_m serves
    bounded = "hopper_w256_t16_partials8"
    assert dispatch.PATHS[bounded].max_m == 16
    table = {"entries": [entry(4096, 4096, [1, 8, 16], [5, 6, 20], [50, 50, 40])]}
    table["entries"][0]["us"][bounded] = [30, 30, 10]
    plan = dispatch.plan_from_table(table, spec(), "t")
    assert plan.path_name(16) == bounded
    for m in (17, 64, 4096):
        assert dispatch.PATHS[plan.path_name(m)].max_m is None or m <= dispatch.PATHS[plan.path_name(m)].max_m
    assert plan.path_name(4096) == "decode"  # 20 us at M = 16, against dequant's 40


@pytest.mark.parametrize("text", ['{"entries": [', "{}", '{"entries": []}', '{"entries": [{"k": 64}]}',
                                  '{"entries": [{"k": 64, "n": 64, "dtype": "float16", "m": [1, 2], "us": {"decode": [1]}}]}'])
def test_an_unusable_user_table_is_an_error_naming_the_file(tmp_path, monkeypatch, text):
    monkeypatch.setenv("HF_INT4_CACHE", str(tmp_path))
    props = SimpleNamespace(name="NVIDIA Test GPU", major=8, minor=0, multi_processor_count=108, clock_rate=1_410_000,
                            memory_clock_rate=1_593_000, memory_bus_width=5120)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    path = dispatch.user_table_dir() / "nvidia_test_gpu.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        dispatch.plan_for(spec(), torch.device("cuda", 0))


def test_tune_with_an_unreadable_user_table_still_writes_its_measurements(tmp_path, monkeypatch, capsys):
    from hf_int4 import _extension, tune

    monkeypatch.setenv("HF_INT4_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "extension_available", lambda: True)
    measured = {"device": "NVIDIA Test GPU", "measured": "2026-01-01",
                "entries": [dict(entry(64, 64, [1], [1.0], [2.0]), group_size=128, sym=True)]}
    monkeypatch.setattr(tune, "measure_table", lambda *args, **kwargs: json.loads(json.dumps(measured)))
    out = dispatch.user_table_dir() / "nvidia_test_gpu.json"
    out.parent.mkdir(parents=True)
    out.write_text('{"entries": [')
    assert tune.main(["--shapes", "64x64", "--ms", "1"]) == 0
    assert json.loads(out.read_text()) == measured
    assert str(out) in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--shapes", "4096X4096"], "--shapes: expected KxN"), (["--shapes", "64x0"], "--shapes: expected KxN"),
    (["--ms", "1,,8"], "--ms: expected positive row counts"), (["--ms", "0"], "--ms: expected positive row counts"),
    (["--group-size", "100"], "--group-size: expected -1"),
])
def test_tune_arguments_are_usage_errors_before_any_gpu_work(monkeypatch, capsys, args, message):
    from hf_int4 import tune

    monkeypatch.setattr(tune, "measure_table", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["tune", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_tune_out_directory_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    from hf_int4 import _extension, tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "extension_available", lambda: True)
    monkeypatch.setattr(tune, "measure_table", lambda *a, **k: pytest.fail("measured for an output it cannot write"))
    assert tune.main(["--shapes", "64x64", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_tune_merges_an_entry_whose_old_times_name_paths_removed_since():
    from hf_int4.tune import merge_tables

    removed = "hopper_sk"  # a stream-K path of older tables
    assert removed not in dispatch.PATHS
    old = dict(entry(4096, 4096, [1, 256], [1, 9], [5, 5]), group_size=128)
    old["us"][removed] = [4, 4]
    fresh = dict(entry(4096, 4096, [1, 64], [1, 2], [5, 5]), group_size=128)
    merged = merge_tables({"device": "G", "entries": [old]}, {"device": "G", "entries": [fresh]})["entries"]
    assert len(merged) == 1 and merged[0]["m"] == [1, 64, 256]
    assert merged[0]["us"] == {"decode": [1, 2, 9], "dequant": [5, 5, 5]}
