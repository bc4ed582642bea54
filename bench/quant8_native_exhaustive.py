"""Check the native 8-bit quantizer against the torch fp16-bits table on every fp32 value.

Every fp32 value in [−1, 1] (signed map: 2,130,706,434 values) and in [0, 1] (unsigned map:
1,065,353,217) is quantized as a normed value (rows of 256 led by a 1.0, so the block absmax is
1 and each value is divided by 1) by :mod:`shardflow.ops.native.quant8` and encoded by
``quant8._encode`` (the table path); prints how many codes differ. Then the same near every
midpoint for ``--scales`` random block scales (:func:`differing_quotients`: the case the
AVX-512 builds' ``x·(1/s)`` must hand to ``x/s``). About 1.5–3 minutes per
build on one core of the shared 2-core CPU, for every build the CPU runs (AVX2, AVX-512, AVX-512
VBMI) or those named by ``--isa``. Run from the repository root:

    /work/venv/bin/python -m bench.quant8_native_exhaustive [--isa avx512]
"""

from __future__ import annotations

import argparse
import time

import torch

from shardflow.ops import quant8
from shardflow.ops.native import quant8 as quant8_native

CHUNK = 255 * 2**16
ONE = 0x3F800000  # the bits of 1.0


def differing_codes(signed: bool) -> tuple[int, int]:
    """(values checked, codes that differ) over every fp32 value of the map's range."""
    blocks = quant8.RowBlocks(256)
    lower, threshold = quant8._fp16_tables((signed,))
    offsets = quant8._offsets(1, 2**16, torch.device("cpu"))
    total = bad = 0
    for sign in (0, -(2**31)) if signed else (0,):
        for start in range(0, ONE + 1, CHUNK):
            bits = torch.arange(start, min(start + CHUNK, ONE + 1), dtype=torch.int64) + sign
            x = bits.to(torch.int32).view(torch.float32)
            n = x.numel()
            rows = torch.cat([x, x.new_zeros(-n % 255)]).view(-1, 255)
            rows = torch.cat([torch.ones(rows.shape[0], 1), rows], 1).contiguous()
            codes, absmax = quant8.empty_state(rows.shape[0], blocks, x.device)
            quant8_native.quantize_rows(codes, absmax, rows, blocks, signed)
            native = codes[:, 1:].reshape(-1)[:n]
            table = quant8._encode(
                x.view(1, 1, -1, 1), torch.ones(1, 1, n), lower, threshold, offsets
            ).view(-1)
            total += n
            bad += int((native != table).sum())
    return total, bad


def differing_quotients(signed: bool, scales: int) -> tuple[int, int]:
    """(values checked, codes that differ) for ``scales`` random block scales ``s`` (log-uniform
    over 10⁻⁸..10⁴): every fp32 value ``q`` within ±300 ulps of each midpoint and code of the
    map, both signs, quantized as ``q·s`` in a block led by ``s``; the reference encodes the
    IEEE quotient ``(q·s)/s`` by the table. Where the kernel norms by ``x·(1/s)`` (AVX-512),
    these quotients are the ones too close to call."""
    code = quant8.dynamic_map(signed)
    mids = quant8_native.thresholds(signed)[:-1]
    points = torch.cat([mids, code, -mids, -code]).view(torch.int32).unsqueeze(1)
    q = (points + torch.arange(-300, 301, dtype=torch.int32)).view(torch.float32).reshape(-1)
    q = q[q.abs() <= 1]
    q = torch.cat([q, q.new_zeros(-q.numel() % 255)]).view(-1, 255)
    blocks = quant8.RowBlocks(256)
    lower, threshold = quant8._fp16_tables((signed,))
    offsets = quant8._offsets(1, 2**16, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    total = bad = 0
    for s in (10.0 ** (torch.rand(scales, generator=gen, dtype=torch.float64) * 12 - 8)).float():
        rows = torch.cat([s.expand(q.shape[0], 1), q * s], 1).contiguous()
        codes, absmax = quant8.empty_state(rows.shape[0], blocks, rows.device)
        quant8_native.quantize_rows(codes, absmax, rows, blocks, signed)
        assert torch.equal(absmax, s.expand_as(absmax))
        y = (rows[:, 1:] / s).reshape(-1)
        table = quant8._encode(
            y.view(1, 1, -1, 1), torch.ones(1, 1, y.numel()), lower, threshold, offsets
        ).view(-1)
        total += y.numel()
        bad += int((codes[:, 1:].reshape(-1) != table).sum())
    return total, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--isa",
        choices=list(quant8_native.ISA_FLAGS),
        action="append",
        help="the kernel build(s) to check (default: every build this CPU runs)",
    )
    ap.add_argument(
        "--scales",
        type=int,
        default=64,
        help="random block scales for the quotient check (0: skip it)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    for isa in args.isa or quant8_native.host_isas():
        quant8_native._library = quant8_native.library(isa)
        if not quant8_native.available():
            raise SystemExit(f"the native kernel ({isa}) is not available here")
        for signed in (True, False):
            started = time.perf_counter()
            total, bad = differing_codes(signed)
            print(
                f"{isa}: signed={signed}: {total} fp32 values, {bad} codes differ "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if args.scales:
                started = time.perf_counter()
                total, bad = differing_quotients(signed, args.scales)
                print(
                    f"{isa}: signed={signed}: {total} quotients near the midpoints and codes "
                    f"({args.scales} scales), {bad} codes differ "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
