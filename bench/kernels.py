"""Local-attention kernel benchmark: Triton against eager batched PyTorch and torch.compile.

    python bench/kernels.py [--device cuda] [--repeats 50] [--out bench/results/kernels.json]

Forward + backward of the masked cross-attention at PRIOR's shapes (B=98, 16 sentences x 49
patches, D=768, sigmoid, both directions) and word-level shapes (B=98, 256 tokens x 49 patches,
both directions; B=64, 256 tokens x 196 or 1024 patches; D=768, softmax). On CUDA (bf16
inputs): median time over many runs after a warm-up, with CUDA events, and the peak memory each
step allocates beyond its inputs. Targets on an
H200: >= 2x faster than eager and <= 1/4 of its peak memory at the word-level shapes; no slower
than eager at PRIOR's shapes. On a CPU only the reference runs (fp32), and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prior_dist.ops.local_attention import local_attention_reference  # noqa: E402

CASES = [
    # name, B, Sq, Sk, D, activation
    ("prior sentence->patch", 98, 16, 49, 768, "sigmoid"),
    ("prior patch->sentence", 98, 49, 16, 768, "sigmoid"),
    ("word->patch P=49", 98, 256, 49, 768, "softmax"),
    ("patch->word P=49", 98, 49, 256, 768, "softmax"),
    ("word-level P=196", 64, 256, 196, 768, "softmax"),
    ("word-level P=1024", 64, 256, 1024, 768, "softmax"),
]


def make_inputs(case, device, dtype, seed=0):
    _, b, sq, sk, d, _ = case
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, n, d, generator=g).to(device, dtype) for n in (sq, sk, sk))
    # Ragged query lengths (reports, sentences), all keys valid except a ragged tail.
    q_len = torch.randint(max(1, sq // 4), sq + 1, (b,), generator=g)
    k_len = torch.randint(max(1, (3 * sk) // 4), sk + 1, (b,), generator=g)
    qm = (torch.arange(sq)[None] < q_len[:, None]).to(device)
    km = (torch.arange(sk)[None] < k_len[:, None]).to(device)
    grad = torch.randn(b, sq, d, generator=g).to(device, dtype)
    return q, k, v, qm, km, grad


SMOKE_CASES = [("smoke sigmoid", 2, 5, 7, 16, "sigmoid"), ("smoke softmax", 2, 9, 6, 16, "softmax")]


def implementations(device, with_triton: bool):
    impls = {"eager": local_attention_reference}
    if device.type == "cuda":
        impls["compile"] = torch.compile(local_attention_reference, dynamic=False)
    if with_triton:
        from prior_dist.kernels.local_attention import triton_local_attention

        impls["triton"] = lambda q, k, v, qm, km, scale, act: triton_local_attention(
            q, k, v, qm, km, scale=scale, activation=act
        )
    return impls


def measure(fn, inputs, activation, scale, device, repeats, warmup):
    q, k, v, qm, km, grad = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves, qm, km, scale, activation)
        out.backward(grad)
        return out

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - start)
        peak = None
    return statistics.median(times), peak, out.detach(), [leaf.grad for leaf in leaves]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="50 on CUDA, 3 on CPU")
    parser.add_argument("--cases", default="all", help="comma-separated case indices, or all")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, Triton through the interpreter on CPU: checks that "
        "this script runs, measures nothing",
    )
    parser.add_argument("--out", default="bench/results/kernels.json")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (50 if cuda else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        os.environ.setdefault("TRITON_INTERPRET", "0")
        name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        name = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"
    print("command: python bench/kernels.py " + " ".join(sys.argv[1:]))
    print(
        f"date {date.today()}  device {name}  torch {torch.__version__}  dtype {dtype}  "
        f"median of {repeats}"
    )
    if not cuda and not args.smoke:
        print(
            "CPU: only the eager reference runs here; Triton and torch.compile timings and "
            "the memory comparison need a GPU (bash bench/gpu_suite.sh)"
        )
    cases = SMOKE_CASES if args.smoke else CASES
    chosen = cases if args.cases == "all" else [cases[int(i)] for i in args.cases.split(",")]
    impls = implementations(device, with_triton=cuda or args.smoke)
    results = []
    json_path = Path(args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    header = {"date": str(date.today()), "device": name, "dtype": str(dtype), "repeats": repeats}
    for case in chosen:
        scale = case[4] ** -0.5
        inputs = make_inputs(case, device, dtype)
        row = {"case": case[0], "shape": list(case[1:5]), "activation": case[5]}
        reference = None
        for label, fn in impls.items():
            seconds, peak, out, grads = measure(
                fn, inputs, case[5], scale, device, repeats, warmup=5 if cuda else 1
            )
            row[label] = {"ms": seconds * 1e3, "peak_mib": None if peak is None else peak / 2**20}
            if reference is None:
                reference = (out, grads)
            else:
                tensors = [(out, reference[0])] + list(zip(grads, reference[1]))
                row[label]["max_rel_diff_vs_eager"] = max(
                    float((a.float() - b.float()).abs().max() / b.float().abs().max())
                    for a, b in tensors
                )
        if "triton" in row:
            row["speedup_vs_eager"] = row["eager"]["ms"] / row["triton"]["ms"]
            if row["eager"]["peak_mib"]:
                row["memory_vs_eager"] = row["triton"]["peak_mib"] / row["eager"]["peak_mib"]
        results.append(row)
        # Written after every case, so a run cut short keeps what it measured.
        json_path.write_text(json.dumps({**header, "results": results}, indent=2))
        parts = [
            f"{label} {row[label]['ms']:.3f} ms"
            + (f" / {row[label]['peak_mib']:.0f} MiB" if row[label]["peak_mib"] else "")
            for label in impls
        ]
        extra = ""
        if "memory_vs_eager" in row:
            extra = (
                f" -> triton {row['speedup_vs_eager']:.2f}x faster, "
                f"{row['memory_vs_eager']:.2f}x the memory of eager, max relative "
                f"difference {row['triton']['max_rel_diff_vs_eager']:.1e}"
            )
        elif "triton" in row:
            extra = f" -> triton agrees to {row['triton']['max_rel_diff_vs_eager']:.1e}"
        print(
            f"{case[0]:<24} B={case[1]} {case[2]}x{case[3]} D={case[4]} {case[5]}: "
            + ", ".join(parts)
            + extra
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
