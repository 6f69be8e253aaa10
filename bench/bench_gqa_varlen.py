"""Packed batches and decoding on the CPU: ``hdaf.delta_attention_varlen`` against the padded call
on the same sequences, and one decoding step (Tq = 1, grouped-query heads) against SDPA.

    pytest bench/bench_gqa_varlen.py --benchmark-only --benchmark-json=bench/results/cpu_gqa_varlen.json
    python bench/bench_gqa_varlen.py --summary bench/results/cpu_gqa_varlen.json   # table + targets

Cases (float32, the ``cpu`` backend):

* **packed vs padded**: B=32 sequences whose lengths are drawn log-normally (median 150, sigma
  0.6, clipped to [1, 600], the longest set to 600; seed 0), H=8, D=64, Dr=64,
  max_distance=64 (R=129). ``padded`` is ``delta_attention`` on [32, 8, 600, 64] with the key
  padding mask, ``varlen`` is ``delta_attention_varlen`` on the packed tokens; forward, and
  forward+backward of the loss on the real tokens. Target: varlen forward+backward >= 2x faster.
  The outputs are checked to match (real rows) before timing.
* **decode**: Tq=1 against Tk in {2048, 8192, 32768} keys, B=1, H=32, Hkv=8, D=128, Dr=64,
  max_distance=64, forward only. ``sdpa`` is ``scaled_dot_product_attention(enable_gqa=True)``
  without bias (the floor), ``cpu`` is ``hdaf.delta_attention`` (including ``P = x·w``).
  Target: cpu <= 1.5x SDPA per call, and no memory that grows with Tq·Tk·Dr.

Rows carry ``extra_info["suite"] == "gqa_varlen"`` (and no ``provider`` key, so bench/report.py's
tables leave them out). Peak extra memory of a call is recorded per case.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import hdaf
from hdaf import dispatch

from _memory import peak_extra_bytes

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU benchmark (the GPU has bench_delta_attention_gpu.py)")

DTYPE = torch.float32
DR, MAXD = 64, 64
R = 2 * MAXD + 1
# packed vs padded
VB, VH, VD, MEDIAN, SIGMA, MAX_LEN = 32, 8, 64, 150, 0.6, 600
# decode
DH, DHKV, DD = 32, 8, 128
DECODE_TK = [2048, 8192, 32768]
TARGETS = {"varlen_speedup": 2.0, "decode_ratio": 1.5}


def lognormal_lengths(n=VB, median=MEDIAN, sigma=SIGMA, max_len=MAX_LEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = (math.log(median) + sigma * z).exp().round().clamp(1, max_len).long()
    lengths[int(lengths.argmax())] = max_len
    return lengths.tolist()


def _rnd(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DTYPE)


def varlen_inputs(seed=0):
    """The same sequences packed ([Σ T, H, D]) and padded ([B, H, max T, D] with a mask)."""
    lengths = lognormal_lengths()
    g = torch.Generator().manual_seed(seed)
    total, T = sum(lengths), max(lengths)
    q, k, v = (_rnd(g, total, VH, VD) for _ in range(3))
    x = _rnd(g, total, DR)
    w = _rnd(g, DR, R, scale=0.05)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pad = lambda t: torch.nn.utils.rnn.pad_sequence(list(torch.split(t, lengths)), batch_first=True)  # noqa: E731
    qp, kp, vp = (pad(t).transpose(1, 2).contiguous() for t in (q, k, v))  # [B,H,T,D]
    xp = pad(x)  # [B,T,Dr]
    mask = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    return dict(lengths=lengths, cu=cu, packed=(q, k, v, x, w), padded=(qp, kp, vp, xp, w),
                mask=mask)


def _varlen_call(inp):
    cu, m = inp["cu"], max(inp["lengths"])
    return lambda q, k, v, x, w: hdaf.delta_attention_varlen(q, k, v, x, w, cu, cu, m, m,
                                                             max_distance=MAXD, backend="cpu")


def _padded_call(inp):
    mask = inp["mask"]
    return lambda q, k, v, x, w: hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask,
                                                      max_distance=MAXD, backend="cpu")


def check_outputs_match(inp):
    """The padded call's real rows equal the packed call's (same sequences, same weights)."""
    with torch.no_grad():
        packed = _varlen_call(inp)(*inp["packed"])
        padded = _padded_call(inp)(*inp["padded"])
    real = padded.transpose(1, 2)[~inp["mask"]]  # [Σ T, H, D]
    torch.testing.assert_close(real, packed, atol=2e-5, rtol=2e-4)


def _info(benchmark, **kw):
    benchmark.extra_info.update(suite="gqa_varlen", dtype=str(DTYPE), threads=torch.get_num_threads(),
                                torch=torch.__version__, Dr=DR, R=R, **kw)


@pytest.fixture(scope="module")
def varlen_data():
    reason = dispatch.unavailable_reason("cpu", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    inp = varlen_inputs()
    check_outputs_match(inp)
    return inp


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["varlen", "padded"])
def bench_packed_vs_padded(benchmark, varlen_data, impl, mode):
    inp = varlen_data
    fn = (_varlen_call if impl == "varlen" else _padded_call)(inp)
    tensors = inp["packed"] if impl == "varlen" else inp["padded"]
    tensors = [t.detach().requires_grad_(mode == "fwd+bwd") for t in tensors]
    lengths = inp["lengths"]
    if impl == "varlen":
        dout = torch.ones(sum(lengths), VH, VD, dtype=DTYPE)
    else:  # the loss on the real tokens only
        dout = (~inp["mask"])[:, None, :, None].to(DTYPE).expand(VB, VH, max(lengths), VD)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(*tensors)
        else:
            out = fn(*tensors)
            torch.autograd.grad(out, tensors, dout)

    step()
    peak = peak_extra_bytes(step, "cpu")
    benchmark.group = f"packed vs padded {mode}"
    _info(benchmark, case="packed_vs_padded", impl=impl, mode=mode, B=VB, H=VH, D=VD,
          lengths=lengths, sum_T2=sum(t * t for t in lengths), B_maxT2=VB * max(lengths) ** 2,
          peak_extra_bytes=peak)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=0)


def decode_inputs(Tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _rnd(g, 1, DH, 1, DD)
    k, v = _rnd(g, 1, DHKV, Tk, DD), _rnd(g, 1, DHKV, Tk, DD)
    x = _rnd(g, 1, Tk, DR)
    w = _rnd(g, DR, R, scale=0.05)
    return q, k, v, x, w


@pytest.mark.parametrize("Tk", DECODE_TK)
@pytest.mark.parametrize("impl", ["sdpa", "cpu"])
def bench_decode(benchmark, impl, Tk):
    if impl == "cpu":
        reason = dispatch.unavailable_reason("cpu", torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
        fn = lambda q, k, v, x, w: hdaf.delta_attention(q, k, v, x, w, max_distance=MAXD,  # noqa: E731
                                                        causal=True, backend="cpu")
    else:
        fn = lambda q, k, v, x, w: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    inp = decode_inputs(Tk)

    def step():
        with torch.no_grad():
            fn(*inp)

    step()
    peak = peak_extra_bytes(step, "cpu")
    benchmark.group = f"decode Tk={Tk}"
    _info(benchmark, case="decode", impl=impl, mode="fwd", B=1, H=DH, Hkv=DHKV, D=DD, Tq=1, Tk=Tk,
          peak_extra_bytes=peak)
    benchmark.pedantic(step, rounds=31, iterations=1, warmup_rounds=1)


# ---- summary of a run ---------------------------------------------------------------------------

def summary(path: str) -> str:
    """Markdown: the packed-vs-padded and decode tables with their targets, met or missed, and
    the run's command, machine and date."""
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("suite") != "gqa_varlen":
            continue
        key = (info["case"], info["impl"], info["mode"], info.get("Tk"))
        rows[key] = dict(ms=b["stats"]["median"] * 1e3, iqr=b["stats"]["iqr"] * 1e3, info=info)
    out = []
    pv = [rows.get(("packed_vs_padded", i, m, None)) for m in ("fwd", "fwd+bwd")
          for i in ("padded", "varlen")]
    if all(pv):
        info = pv[0]["info"]
        out += [f"Packed vs padded: B={info['B']} sequences (log-normal lengths, median {MEDIAN}, "
                f"max {max(info['lengths'])}; Σ T² = {info['sum_T2']:,} vs B·max² = "
                f"{info['B_maxT2']:,}), H={info['H']}, D={info['D']}, Dr={DR}, R={R}, "
                f"float32, cpu backend, median ms:", "",
                "| | padded | varlen | speedup | target |", "|---|---|---|---|---|"]
        for m, (pad, var) in (("fwd", pv[:2]), ("fwd+bwd", pv[2:])):
            sp = pad["ms"] / var["ms"]
            tgt = (f">= {TARGETS['varlen_speedup']:g}x: "
                   f"{'met' if sp >= TARGETS['varlen_speedup'] else 'missed'}"
                   if m == "fwd+bwd" else "")
            out.append(f"| {m} | {pad['ms']:.0f} | {var['ms']:.0f} | {sp:.2f}x | {tgt} |")
        out.append("")
    dec = [(tk, rows.get(("decode", "sdpa", "fwd", tk)), rows.get(("decode", "cpu", "fwd", tk)))
           for tk in DECODE_TK]
    dec = [d for d in dec if d[1] and d[2]]
    if dec:
        out += [f"Decode: Tq=1, B=1, H={DH}, Hkv={DHKV}, D={DD}, Dr={DR}, R={R}, float32, forward, "
                "median ms (peak extra memory):", "",
                "| Tk | SDPA (enable_gqa) | cpu | ratio | target |", "|---|---|---|---|---|"]
        for tk, s, c in dec:
            ratio = c["ms"] / s["ms"]
            mem = lambda r: f"{(r['info'].get('peak_extra_bytes') or 0) / 2**20:.1f} MiB"  # noqa: E731
            ok = "met" if ratio <= TARGETS["decode_ratio"] else "missed"
            out.append(f"| {tk} | {s['ms']:.2f} ({mem(s)}) | {c['ms']:.2f} ({mem(c)}) | "
                       f"{ratio:.2f}x | <= {TARGETS['decode_ratio']:g}x: {ok} |")
        out.append("")
    run = data.get("run", {})
    cpu = data.get("machine_info", {}).get("cpu", {})
    threads = next(iter(rows.values()))["info"].get("threads") if rows else None
    out.append(f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, "
               f"{threads} threads; torch {run.get('torch', '?')}; commit "
               f"{(run.get('commit') or '?')[:7]}{' (dirty)' if run.get('dirty') else ''}; "
               f"{run.get('date_utc', data.get('datetime', '?'))}; command: "
               f"`{run.get('command', '?')}`")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", metavar="JSON", required=True,
                    help="a pytest-benchmark JSON of this file: print its tables and targets")
    print(summary(ap.parse_args().summary))
