"""bench/static_profile.py: SASS parser, loop finder, classes, MAC formula and the markdown report,
on a hand-written sm_90 SASS listing (no compile); and one real sm_90 compile in a child process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "static_profile", os.path.join(REPO, "bench", "static_profile.py"))
sp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("static_profile", sp)  # dataclasses look their module up there
_spec.loader.exec_module(sp)

# nvdisasm -c -gi style: a prologue with a barrier spin-wait, a hot loop [0x80, 0x1d0] with
# wgmma, exp2, a masked path a forward branch skips and spills, a second loop [0x1e0, 0x230]
# with mma.sync and a nested loop, EXIT, then an out-of-line retry and the self-branch tail.
SASS = """\
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"

//--------------------- .text.toy_kernel         --------------------------
\t.section\t.text.toy_kernel,"ax",@progbits
        .global         toy_kernel
toy_kernel:
.text.toy_kernel:
\t//## File "/src/toy.py", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/                   MOV R2, RZ ;
.L_x_0:
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3 ;
        /*0060*/              @!P1 BRA `(.L_x_0) ;
        /*0070*/                   IMAD.MOV.U32 R4, RZ, RZ, RZ ;
.L_x_1:
\t//## File "/src/toy.py", line 10 inlined at "/src/toy.py", line 20
        /*0080*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R6.64] ;
        /*0090*/                   WARPGROUP.ARRIVE ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00d0*/                   FMNMX R7, R24, R25, !PT ;
        /*00e0*/              @!P2 BRA `(.L_x_2) ;
        /*00f0*/                   FSEL R24, R24, -INF , P3 ;
        /*0100*/                   FSEL R25, R25, -INF , P4 ;
.L_x_2:
        /*0110*/                   FFMA R8, R24, UR4, -R7 ;
        /*0120*/                   MUFU.EX2 R8, R8 ;
        /*0130*/                   MUFU.RCP R9, R9 ;
        /*0140*/                   F2FP.BF16.F32.PACK_AB R10, R9, R8 ;
        /*0150*/                   STL [R1], R10 ;
        /*0160*/                   LDL R11, [R1+0x4] ;
        /*0170*/                   LDS R12, [R13] ;
        /*0180*/                   STS [R13], R12 ;
        /*0190*/                   UIADD3 UR4, UR4, 0x40, URZ ;
        /*01a0*/                   IADD3 R4, R4, 0x40, RZ ;
        /*01b0*/                   ISETP.GE.AND P0, PT, R4, R14, PT ;
        /*01c0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*01d0*/              @!P0 BRA `(.L_x_1) ;
.L_x_3:
        /*01e0*/                   HMMA.16816.F32.BF16 R24, R16, R20, R24 ;
        /*01f0*/                   SHFL.BFLY PT, R2, R3, 0x1, 0x1f ;
.L_x_4:
        /*0200*/                   FADD R3, R3, R2 ;
        /*0210*/               @P1 BRA `(.L_x_4) ;
        /*0220*/                   STG.E desc[UR4][R2.64], R3 ;
        /*0230*/               @P0 BRA `(.L_x_3) ;
        /*0240*/                   EXIT ;
.L_x_5:
        /*0250*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3 ;
        /*0260*/              @!P1 BRA `(.L_x_5) ;
        /*0270*/                   BRA `(.L_x_1) ;
.L_x_6:
        /*0280*/                   BRA `(.L_x_6);
        /*0290*/                   NOP;
.L_x_7:


//--------------------- SYMBOLS --------------------------
"""

PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for fwd_kernel
    8 bytes stack frame, 192 bytes spill stores, 212 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size
"""


def test_parse_sass_instructions_and_labels():
    instrs, labels = sp.parse_sass(SASS)
    assert len(instrs) == 42
    assert instrs[0] == sp.Instr(0x0, "LDC", "R1, c[0x0][0x28]", "")
    hgmma = instrs[10]
    assert (hgmma.addr, hgmma.opcode, hgmma.base) == (0xa0, "HGMMA.64x64x16.F32.BF16", "HGMMA")
    bra = next(i for i in instrs if i.addr == 0x1d0)
    assert (bra.pred, bra.base, bra.target) == ("@!P0", "BRA", ".L_x_1")
    assert labels[".L_x_0"] == 0x50 and labels[".L_x_1"] == 0x80 and labels[".L_x_2"] == 0x110
    assert labels[".L_x_6"] == 0x280 and ".L_x_7" not in labels  # no instruction after it


def test_classify():
    expect = {"HGMMA.64x64x16.F32.BF16": "wgmma", "HMMA.16816.F32.BF16": "mma_sync",
              "MUFU.EX2": "ex2", "MUFU.RCP": "mufu", "FFMA": "fp32", "FSETP.GT.AND": "fp32",
              "F2FP.BF16.F32.PACK_AB": "convert", "IMAD.WIDE.U32": "integer",
              "UIADD3": "integer", "LOP3.LUT": "integer", "LDG.E.128": "global",
              "LDGSTS.E.BYPASS.128": "global", "UTMALDG.2D": "global", "LDSM.16.M88.4": "shared",
              "STS.128": "shared", "LDL.64": "local", "STL": "local", "BAR.SYNC": "barrier",
              "SYNCS.ARRIVE.TRANS64": "barrier", "WARPGROUP.ARRIVE": "barrier",
              "SHFL.BFLY": "other", "MOV": "other", "UMOV": "other", "BRA": "other"}
    assert {op: sp.classify(op) for op in expect} == expect


def test_find_loops_with_matrix_before_exit():
    instrs, labels = sp.parse_sass(SASS)
    # not the spin-wait (no matrix), not the nested [0x200, 0x210] (no matrix), nothing after EXIT
    assert sp.find_loops(instrs, labels) == [(0x80, 0x1d0), (0x1e0, 0x230)]


def test_find_loops_takes_the_inner_of_nested_matrix_loops():
    """A loop around the tile loops (a walk over heads) is not itself a hot loop."""
    instrs = [sp.Instr(0x00, "S2R", "R0, SR_TID.X", ""),
              sp.Instr(0x10, "HGMMA.64x64x16.F32.BF16", "R24, gdesc[UR4], R24", ""),
              sp.Instr(0x20, "FADD", "R1, R1, R2", ""),
              sp.Instr(0x30, "BRA", "`(.L_x_1)", "@P0"),
              sp.Instr(0x40, "IADD3", "R4, R4, 0x1, RZ", ""),
              sp.Instr(0x50, "BRA", "`(.L_x_0)", "@P1"),
              sp.Instr(0x60, "EXIT", "", "")]
    labels = {".L_x_0": 0x00, ".L_x_1": 0x10}
    assert sp.find_loops(instrs, labels) == [(0x10, 0x30)]


def test_loop_counts_by_class():
    instrs, labels = sp.parse_sass(SASS)
    c = sp.loop_counts(instrs, labels, (0x80, 0x1d0))
    assert c["instructions"] == 22
    assert {k: c[k] for k in sp.CLASSES} == {
        "wgmma": 2, "mma_sync": 0, "ex2": 1, "mufu": 1, "fp32": 4, "convert": 1, "integer": 3,
        "global": 1, "shared": 2, "local": 2, "barrier": 3, "other": 2}
    assert (c["matrix"], c["spill_ld"], c["spill_st"], c["skippable"]) == (2, 1, 1, 2)
    c2 = sp.loop_counts(instrs, labels, (0x1e0, 0x230))
    assert (c2["instructions"], c2["mma_sync"], c2["matrix"], c2["skippable"]) == (6, 1, 1, 0)


def test_macs_and_non_matrix_per_kmac():
    assert sp.macs_per_iteration("fwd", 128, 64, 64, 64) == 128 * 64 * 128
    assert sp.macs_per_iteration("dkdv", 32, 128, 64, 64) == 2 * 32 * 128 * 128
    assert sp.macs_per_iteration("dq", 128, 32, 128, 64) == 128 * 32 * 320
    with pytest.raises(ValueError):
        sp.macs_per_iteration("preprocess", 64, 64, 64, 64)
    # Triton's fused-attention tutorial forward: 128x64, D=64, 4 warps, 514 instr, 16 wgmma
    macs = sp.macs_per_iteration("fwd", 128, 64, 64, 64)
    assert sp.non_matrix_per_kmac(514, 16, macs, 4) == pytest.approx(498 / 256)


def test_profile_sass_labels_and_figures():
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    loops = sp.profile_sass(SASS, "fwd", cfg, 64, 64, ("far", "band"))
    assert [lp["label"] for lp in loops] == ["far", "band"]
    assert (loops[0]["first"], loops[0]["last"]) == ("0x0080", "0x01d0")
    macs = 64 * 32 * 128
    assert loops[0]["macs"] == macs
    assert loops[0]["non_matrix_per_kmac"] == pytest.approx(20 / (macs / 4 / 1024), abs=1e-3)
    assert loops[0]["non_matrix_per_kmac_no_skippable"] == pytest.approx(
        18 / (macs / 4 / 1024), abs=1e-3)
    # loop names that do not match the loops found are replaced by positions
    relabelled = sp.profile_sass(SASS, "fwd", cfg, 64, 64, ("far", "band", "far"))
    assert [lp["label"] for lp in relabelled] == ["loop0", "loop1"]


def test_parse_ptxas_log():
    assert sp.parse_ptxas_log(PTXAS_LOG) == dict(registers=255, stack=8, spill_stores=192,
                                                 spill_loads=212)
    assert sp.parse_ptxas_log("ptxas fatal   : Unresolved extern function") is None


def _row(kernel, D, cfg, far, band, regs=200, spill=0, hot_spill=0, mma=0, dtype="bf16"):
    loop = dict(instructions=500, matrix=16, mma_sync=mma, spill_ld=hot_spill, spill_st=0,
                skippable=10)
    return dict(kernel=kernel, arch=90, dtype=dtype, D=D, delta=True,
                config=dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=cfg[2], num_stages=cfg[3]),
                registers=regs, spill_stores=spill, spill_loads=spill, stack=spill, shared=65536,
                error=None, compile_s=1.0,
                loops=[dict(loop, label="far", non_matrix_per_kmac=far,
                            non_matrix_per_kmac_no_skippable=far - 0.1),
                       dict(loop, label="band", non_matrix_per_kmac=band,
                            non_matrix_per_kmac_no_skippable=band - 0.1),
                       dict(loop, label="far", non_matrix_per_kmac=far - 0.05,
                            non_matrix_per_kmac_no_skippable=far - 0.15)])


def _doc(rows):
    return dict(arch=90, command="python bench/static_profile.py", date_utc="2026-11-30 12:00 UTC",
                wall_s=42.0, machine=dict(platform="Linux", cpu="AMD EPYC", cores=2),
                versions=dict(python="3.11", torch="2.14.1", triton="3.8.0", nvdisasm="V13.1"),
                git_commit="0123456789abcdef", kernels_modified=False, rows=rows)


def test_report_best_config_and_targets():
    rows = [
        # lowest far figure, but it spills in a hot loop: not the best
        _row("fwd", 64, (128, 128, 8, 3), far=1.9, band=3.0, spill=96, hot_spill=4),
        _row("fwd", 64, (128, 64, 4, 3), far=2.2, band=4.5),
        _row("fwd", 64, (64, 64, 4, 4), far=2.6, band=3.5),
        _row("dkdv", 64, (32, 128, 4, 3), far=1.5, band=3.0, mma=2),
        _row("dq", 64, (128, 32, 4, 3), far=1.7, band=3.9),
        dict(kernel="dq", arch=90, dtype="bf16", D=64, delta=True,
             config=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
             error="PTXASError: `ptxas` failed with error code 255\nmore", compile_s=0.5),
    ]
    best, spilling = sp.best_row([r for r in rows if r["kernel"] == "fwd"])
    assert best["config"]["BLOCK_N"] == 64 and not spilling
    md = sp.render_markdown(_doc(rows))
    assert "| forward (fwd) | 64 | 128×64, 4 w, 3 st | 200 | 2.20 | ≤ 2.4: met | 4.50 " \
           "| ≤ 4.0: missed (4.50) |" in md
    assert "| dK/dV (dkdv) | 64 | 32×128, 4 w, 3 st (mma.sync) | 200 | 1.50 | ≤ 1.6: met " \
           "| 3.00 | ≤ 3.5: met |" in md
    assert "| no mma.sync (HMMA) in a hot loop | met | missed (6 HMMA in 1 configs) | met |" in md
    assert ("| no spill load/store in a hot loop | missed (1 of 3 configs, e.g. 128×128, 8 w, "
            "3 st bf16 D=64) | met | met |") in md
    assert "| ≤ 64 spilled bytes per kernel | missed (96 B) | met | met |" in md
    # every configuration, one line per loop; the failed compile as a row
    assert "| 128×64, 4 w, 3 st | 200 | 0/0 | 64 | far | 500 | 10 | 16 | 0/0 | 2.20 | 2.10 |" in md
    assert "| | | | | band | 500 | 10 | 16 | 0/0 | 4.50 | 4.40 |" in md
    assert "compile failed: PTXASError: `ptxas` failed with error code 255 |" in md
    assert "1 configuration(s) failed to compile" in md


def test_report_cli_prints_markdown_from_json(tmp_path, capsys):
    path = tmp_path / "static_sm90.json"
    doc = _doc([_row("fwd", 128, (128, 64, 4, 3), far=2.3, band=3.9)])
    path.write_text(json.dumps(doc))
    assert sp.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == sp.render_markdown(doc)
    assert out.startswith("# Static machine-code profile, sm_90")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the kernels instead")
def test_compile_one_configuration_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "static_profile.py"),
                          "--quick", "--kernels", "dq", "--scenarios", "train", "--jobs", "1",
                          "--out-dir",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((tmp_path / "static_sm90.json").read_text())
    (row,) = doc["rows"]
    assert row["error"] is None, row["error"]
    assert (row["kernel"], row["arch"], row["dtype"], row["D"]) == ("dq", 90, "bf16", 64)
    assert 0 < row["registers"] <= 255 and row["shared"] > 0
    assert row["loops"] and all(lp["wgmma"] > 0 and lp["mma_sync"] == 0 for lp in row["loops"])
    assert (tmp_path / "static_sm90.md").read_text().startswith("# Static machine-code profile")


def test_kv_traffic_is_one_cache_read_when_stacked_and_g_reads_per_query_head():
    """Bytes per generated token from a decoding launch's grid: the stacked launch (one program
    group per key/value head) reads the cache once; a launch per query head reads it G times."""
    from types import SimpleNamespace
    kw = dict(T=8192, SPLIT=True, SPLIT_N=1024, STACK=True, DK=64, DV=64)
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    sc = sp.SCENARIOS["decode_g8"]
    stacked = SimpleNamespace(kwargs=kw, grid=lambda m: (1, sc["B"] * sc["Hkv"], 8))
    per_head = SimpleNamespace(kwargs=dict(kw, STACK=False),
                               grid=lambda m: (1, sc["B"] * sc["H"], 8))
    a = sp.kv_traffic(stacked, cfg, "decode_g8", 2)
    b = sp.kv_traffic(per_head, cfg, "decode_g8", 2)
    assert a["cache_bytes"] == sc["Hkv"] * 8192 * 128 * 2
    assert a["reads_of_cache"] == 1.0 and b["reads_of_cache"] == 8.0 and a["G"] == 8
    md = sp.render_markdown(dict(_doc([]), kv_traffic=[dict(a, dtype="bf16"),
                                                         dict(b, dtype="bf16")]))
    assert "| 1.000 | 1.00 ± 5%: met |" in md and "| 8.000 | 1.00 ± 5%: missed (8.00) |" in md


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_captured_decoding_launches_are_stacked_split_and_read_the_cache_once():
    for scenario in ("decode_g1", "decode_g4", "decode_g8"):
        (ln,) = sp.capture("bf16", 64, True, scenario)
        t = sp.kv_traffic(ln, sp._config_dict(ln.configs[0]), scenario, 2)
        assert ln.kwargs["STACK"] and t["splits"] > 1, (scenario, t)
        assert abs(t["reads_of_cache"] - 1) <= sp.KV_TRAFFIC_TOLERANCE, (scenario, t)
