"""bench/static_profile_cute.py: the unit configurations, the path bounds on a hand-written SASS
listing, and the committed sm_90 / sm_80 results (no compile here)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "static_profile_cute", os.path.join(REPO, "bench", "static_profile_cute.py"))
spc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("static_profile_cute", spc)
_spec.loader.exec_module(spc)

# A loop [0x20, 0xc0]: HMMA, a two-way branch (3 or 1 instructions), a forward branch out of the
# loop, the back edge; then EXIT.
SASS = """\
//--------------------- .text.toy_kernel         --------------------------
toy_kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_0:
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   FADD R3, R3, 1 ;
        /*0060*/                   FMUL R3, R3, R3 ;
        /*0070*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0080*/                   FADD R3, R3, 2 ;
.L_x_2:
        /*0090*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00a0*/                   ISETP.GE.AND P1, PT, R2, 0x20, PT ;
        /*00b0*/               @P1 BRA `(.L_x_3) ;
        /*00c0*/                   BRA `(.L_x_0) ;
.L_x_3:
        /*00d0*/                   EXIT ;
"""


def test_path_bounds_on_a_hand_written_loop():
    instrs, labels = spc.sp.parse_sass(SASS)
    loops = spc.sp.find_loops(instrs, labels)
    assert loops == [(0x20, 0xc0)]
    spans = spc.path_spans(instrs, labels, loops[0])
    # shortest: HMMA, ISETP, BRA, FADD(2), IADD3, ISETP, BRA, BRA = 7 non-matrix + 1 matrix
    # longest:  HMMA, ISETP, BRA, FADD, FMUL, BRA, IADD3, ISETP, BRA, BRA = 9 + 1
    assert spans == dict(shortest=dict(non_matrix=7, matrix=1), longest=dict(non_matrix=9, matrix=1))


def test_unit_configurations():
    got = sorted((c["unit"], c["dtype"], c["D"], c["BLOCK_M"], c["BLOCK_N"], c["num_warps"])
                 for c in map(spc.unit_config, glob.glob(spc.UNITS_GLOB)))
    assert [g[:3] for g in got] == [("fwd_bf16_hdim128.cu", "bf16", 128),
                                    ("fwd_bf16_hdim64.cu", "bf16", 64),
                                    ("fwd_fp16_hdim128.cu", "fp16", 128),
                                    ("fwd_fp16_hdim64.cu", "fp16", 64)]


@pytest.mark.parametrize("arch", (90, 80))
def test_committed_profile(arch):
    """Every shipped unit profiled without errors; the forward kernel has its four key-tile loops
    (unmasked far-low, band, far-high, masked), each holding exactly the mma.sync of one key
    tile per warp (the count the CPU emulation test requires too); no spill in the far and band
    loops; the shortest path is at most the longest, which is at most the whole body; the
    markdown is the JSON's rendering."""
    base = os.path.join(REPO, "bench", "results", f"static_cute_sm{arch}")
    with open(base + ".json") as f:
        doc = json.load(f)
    assert doc["arch"] == arch
    assert sorted(r["unit"] for r in doc["rows"]) == sorted(
        os.path.basename(u) for u in glob.glob(spc.UNITS_GLOB))
    for r in doc["rows"]:
        assert not r.get("error"), r["unit"]
        assert [lp["label"] for lp in r["loops"]] == list(spc.FWD_LOOPS), r["unit"]
        bm, bn, w, d = r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["D"]
        for lp in r["loops"]:
            where = (r["unit"], lp["label"])
            assert lp["mma_sync"] == lp["matrix"] == (bm // w // 16) * 2 * bn * d // 128, where
            if lp["label"] != "masked":
                assert lp["spill_ld"] == lp["spill_st"] == 0, where
            p = lp["paths"]
            assert p["shortest"]["matrix"] == p["longest"]["matrix"] == lp["matrix"], where
            assert p["shortest"]["non_matrix"] <= p["longest"]["non_matrix"] <= \
                lp["instructions"] - lp["matrix"], where
    with open(base + ".md") as f:
        assert f.read() == spc.render_markdown(doc)


# Two kernels in one listing (addresses restart per section) and their ptxas entries.
TWO_KERNELS = SASS.replace("toy_kernel", "_Z9dq_kernelv") + SASS.replace("toy_kernel", "_Z11dkdv_kernelv")
PTXAS_LOG = """\
ptxas info    : Compiling entry function '_Z11dkdv_kernelv' for 'sm_90'
ptxas info    : Function properties for _Z11dkdv_kernelv
    64 bytes stack frame, 60 bytes spill stores, 88 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 64 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z9dq_kernelv' for 'sm_90'
ptxas info    : Function properties for _Z9dq_kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 254 registers, used 1 barriers
"""


def test_backward_listing_split_per_kernel():
    funcs = spc.split_functions(TWO_KERNELS)
    assert sorted(funcs) == ["_Z11dkdv_kernelv", "_Z9dq_kernelv"]
    for text in funcs.values():
        instrs, labels = spc.sp.parse_sass(text)
        assert spc.sp.find_loops(instrs, labels) == [(0x20, 0xc0)]
    usage = spc.parse_ptxas_entries(PTXAS_LOG)
    assert usage["_Z11dkdv_kernelv"] == dict(registers=255, stack=64, spill_stores=60, spill_loads=88)
    assert usage["_Z9dq_kernelv"] == dict(registers=254, stack=0, spill_stores=0, spill_loads=0)


def test_backward_unit_configurations():
    got = sorted((c["unit"], c["direction"], c["dtype"], c["D"])
                 for c in map(spc.unit_config, glob.glob(spc.BWD_UNITS_GLOB)))
    assert got == [("bwd_bf16_hdim128.cu", "bwd", "bf16", 128),
                   ("bwd_bf16_hdim64.cu", "bwd", "bf16", 64),
                   ("bwd_fp16_hdim128.cu", "bwd", "fp16", 128),
                   ("bwd_fp16_hdim64.cu", "bwd", "fp16", 64)]


@pytest.mark.parametrize("arch", (90, 80))
def test_committed_backward_profile(arch):
    """Every backward unit profiled without errors; per kernel four hot loops, one per tile kind
    (masked, far-low, band, far-high), each holding exactly the mma.sync of one tile per warp
    (dQ: S, dP, dQ; dK/dV: S, dP, dV, dK; the counts the CPU emulation test requires too); the
    band and masked loops, and only they, hold the bias gather; shortest path <= longest <= whole
    body (the gather counted as often as it runs); the dQ kernel's far loops load the next key
    tile in every iteration (no branch around it: their longest path is the whole body); the
    verdicts are on the longest path; the markdown is the JSON's rendering. Spills are reported,
    not required to be zero."""
    base = os.path.join(REPO, "bench", "results", f"static_cute_bwd_sm{arch}")
    with open(base + ".json") as f:
        doc = json.load(f)
    assert doc["arch"] == arch
    assert sorted(r["unit"] for r in doc["rows"]) == sorted(
        os.path.basename(u) for u in glob.glob(spc.BWD_UNITS_GLOB))
    for r in doc["rows"]:
        assert not r.get("error"), r["unit"]
        bm, bn, w, d = r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["D"]
        want = {"dq_kernel": (bm // w // 16) * 3 * bn * d // 128,
                "dkdv_kernel": (bn // w // 16) * 4 * bm * d // 128}
        assert sorted(k["kernel"] for k in r["kernels"]) == sorted(want), r["unit"]
        for k in r["kernels"]:
            assert not k.get("error") and k["ptxas"]["registers"] <= 255, (r["unit"], k)
            assert sorted(lp["label"] for lp in k["loops"]) == [
                "band", "far-high", "far-low", "masked"], (r["unit"], k["kernel"])
            for lp in k["loops"]:
                assert lp["mma_sync"] == lp["matrix"] == want[k["kernel"]], (r["unit"], lp)
                gather = lp["inner_loop"]
                assert (gather is not None) == (lp["label"] in ("band", "masked")), lp["label"]
                extra = (gather["iterations"] - 1) * gather["non_matrix"] if gather else 0
                p = lp["paths"]
                assert p["shortest"]["matrix"] == p["longest"]["matrix"] == lp["matrix"]
                assert p["shortest"]["non_matrix"] <= p["longest"]["non_matrix"] <= \
                    lp["instructions"] - lp["matrix"] + extra
                assert spc.bwd_issued(lp) == p["longest"]["non_matrix_per_kmac"]
                if k["kernel"] == "dq_kernel" and lp["label"] in ("far-low", "far-high"):
                    assert p["longest"]["non_matrix"] == lp["instructions"] - lp["matrix"], \
                        (r["unit"], lp["label"], "a branch skips part of the far loop's body")
    with open(base + ".md") as f:
        assert f.read() == spc.render_markdown_bwd(doc)
