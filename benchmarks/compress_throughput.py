"""Encode/decode throughput of every codec on one CPU thread, against two baselines.

For each codec: GB/s of fp32 input for ``compress`` (encode), ``decompress`` (decode) and
``decompress_mean`` of two ranks' payloads into a kept buffer (``mean2``: the decode a
training step runs, straight into ``.grad``), bits per value on the wire (header included),
and the ratio of the encode and decode speeds to

  (a) ``copy_`` of the input into a preallocated buffer (the memory-bandwidth ceiling), and
  (b) an unfused eager QSGD (4-bit levels, one int8 per value, ``torch.rand_like``),

all measured in the same run. Verdict lines check the targets: QSGD 4-bit encode >= 6x and
decode >= 8x the eager version; AdaComp encode >= 0.5 GB/s.

The compiled kernels are warmed up (compiled) before timing; compile time is reported apart.
AdaComp and the sparsifiers run on a stream: their memory is warmed with 20 steps of fresh
Gaussian "gradients" first, so the timed steps see a steady-state residue.

``--malloc tuned`` raises glibc's mmap/trim thresholds (``mallopt``) so that freeing a large
tensor keeps its pages for the next one (on small VMs a fresh 16 MB tensor can cost more in page
faults than the arithmetic); it applies to every row, baselines included. Default: untouched.
``identity`` decodes without a copy (its payload part already is the fp32 tensor), so its
decode figure measures only the call overhead.

    python benchmarks/compress_throughput.py [--quick] [--numel N] [--malloc default]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time

import torch

from dist_soup.compress import build, kernels


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap (glibc only); returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return bool(ok)


def timeit(fn, repeat: int, min_time: float = 0.2) -> float:
    """Median seconds per call over ``repeat`` rounds, each round at least ``min_time`` long."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_time / 4 or n >= 64:
            break
        n *= 2
    rounds = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t) / n)
    return statistics.median(rounds)


# --- the eager baseline: QSGD as one would write it in plain torch ---------------------------
def eager_qsgd_encode(x: torch.Tensor, s: int = 7, d: int = 512):
    xb = x.view(-1, d)
    norm = xb.abs().amax(dim=1, keepdim=True)
    r = xb.abs() / norm * s
    lvl = r.floor()
    lvl += torch.rand_like(r) < (r - lvl)
    return norm, (lvl * xb.sign()).to(torch.int8)


def eager_qsgd_decode(norm: torch.Tensor, q: torch.Tensor, s: int = 7) -> torch.Tensor:
    return (q.to(torch.float32) * (norm / s)).view(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller input, fewer codecs and repeats")
    ap.add_argument("--numel", type=int, default=None, help="values per tensor (default 4M, quick 1M)")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="default")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    tuned = tune_malloc() if args.malloc == "tuned" else False
    n = args.numel or ((1 << 20) if args.quick else (1 << 22))
    n = -(-n // 512) * 512
    repeat = args.repeat or (3 if args.quick else 5)
    gbytes = n * 4 / 1e9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    stream = [torch.randn(n, generator=gen) for _ in range(4)]

    print(f"dist_soup compression throughput: {n} fp32 values ({n * 4 / 2**20:.0f} MiB), 1 thread")
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, "
        f"malloc {'tuned' if tuned else 'default'}, "
        f"compile {'on' if kernels.compile_enabled() else 'off (DIST_SOUP_COMPILE=0)'}"
    )

    buf = torch.empty_like(x)
    t_copy = timeit(lambda: buf.copy_(x), repeat)
    norm, q = eager_qsgd_encode(x)
    t_eenc = timeit(lambda: eager_qsgd_encode(x), repeat)
    t_edec = timeit(lambda: eager_qsgd_decode(norm, q), repeat)
    print(
        f"baselines: copy_ {gbytes / t_copy:.2f} GB/s; eager QSGD (int8/value, rand_like) "
        f"encode {gbytes / t_eenc:.3f} GB/s, decode {gbytes / t_edec:.3f} GB/s"
    )

    cases = [
        ("identity", {}, None),
        ("fp16", {}, None),
        ("bf16", {}, None),
        ("qsgd", dict(bits=2), None),
        ("qsgd", dict(bits=4), None),
        ("qsgd", dict(bits=8), None),
        ("qsgd", dict(bits=4, backend="eager"), None),
        ("qsgd", dict(bits=2, norm="l2", coding="elias"), None),
        ("adacomp", {}, (n,)),  # dense rule: bins of 500
        ("adacomp", {}, (n // 64, 64, 1, 1)),  # conv-shaped: bins of 50
        ("topk", dict(ratio=0.01), None),
        ("randomk", dict(ratio=0.01), None),
        ("cltk", dict(ratio=0.01), None),
    ]
    if args.quick:
        cases = [c for c in cases if c[0] in ("identity", "fp16", "qsgd", "adacomp") and "coding" not in c[1]]

    rows = []
    results = {}
    for name, opts, shape in cases:
        label = (
            name
            + "".join(f" {k}={v}" for k, v in opts.items())
            + (f" {'conv' if len(shape) > 1 else 'dense'}" if shape else "")
        )
        label += " (zero-copy decode)" if name == "identity" else ""
        c = build(name, **opts)
        xs = [s.view(shape) if shape else s for s in stream]
        compile_s = 0.0
        if name == "qsgd" and opts.get("backend", "auto") != "eager" and kernels.compile_enabled():
            t = time.perf_counter()
            c.decompress(c.compress(xs[0]))  # compiles encode + decode for this configuration
            compile_s = time.perf_counter() - t
        steps = 20 if name in ("adacomp", "topk", "cltk") else 1
        for i in range(steps):
            c.compress(xs[i % 4])
        p = c.compress(xs[steps % 4])  # sizes reported at a fixed step (timing advances the stream)
        peer = build(name, **opts, rank=1).compress(xs[(steps + 1) % 4])  # another rank's payload
        it = iter(range(1 << 30))
        t_enc = timeit(lambda c=c, xs=xs, it=it: c.compress(xs[next(it) % 4]), repeat)
        t_dec = timeit(lambda c=c, p=p: c.decompress(p), repeat)
        mean_out = torch.empty(p.shape, dtype=p.dtype)
        t_mean = timeit(lambda c=c, p=p, q=peer, o=mean_out: c.decompress_mean([p, q], out=o), repeat)
        bits = p.nbytes * 8 / n
        rows.append(
            (
                label,
                gbytes / t_enc,
                gbytes / t_dec,
                bits,
                t_copy / t_enc,
                t_eenc / t_enc,
                t_copy / t_dec,
                t_edec / t_dec,
                compile_s,
                gbytes / t_mean,
            )
        )
        results[label] = rows[-1]

    head = (
        f"{'codec':34s} {'enc GB/s':>9s} {'dec GB/s':>9s} {'mean2 GB/s':>10s} {'bits/val':>8s} {'enc/copy':>8s} "
        f"{'enc/eager':>9s} {'dec/copy':>8s} {'dec/eager':>9s} {'compile s':>9s}"
    )
    print()
    print(head)
    print("-" * len(head))
    for label, ge, gd, bits, ec, ee, dc, de, cs, gm in rows:
        print(
            f"{label:34s} {ge:9.3f} {gd:9.3f} {gm:10.3f} {bits:8.3f} {ec:8.3f} {ee:9.2f} {dc:8.3f} {de:9.2f} {cs:9.1f}"
        )
    print()

    def verdict(ok: bool, text: str) -> None:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")

    q4 = results.get("qsgd bits=4")
    if q4:
        verdict(
            q4[5] >= 6, f"QSGD 4-bit encode {q4[5]:.1f}x the eager QSGD (target >= 6x), {q4[1]:.2f} GB/s (toward 2)"
        )
        verdict(
            q4[7] >= 8, f"QSGD 4-bit decode {q4[7]:.1f}x the eager QSGD (target >= 8x), {q4[2]:.2f} GB/s (toward 4)"
        )
        verdict(
            q4[2] >= 4,
            f"QSGD 4-bit decode {q4[2]:.2f} GB/s absolute (goal 4 GB/s; copy_ runs at {gbytes / t_copy:.2f})",
        )
        verdict(q4[1] >= 2, f"QSGD 4-bit encode {q4[1]:.2f} GB/s absolute (goal 2 GB/s)")
    for label in ("adacomp dense", "adacomp conv"):
        a = results.get(label)
        if a:
            verdict(
                a[1] >= 0.5, f"{label} encode {a[1]:.2f} GB/s (target >= 0.5), {32 / a[3]:.0f}x fewer bytes than fp32"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
