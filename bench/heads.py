"""PRIOR heads benchmark, measured side by side in one run.

    python bench/heads.py [--batch 32] [--repeats 5] [--threads 1] [--out bench/results/heads.json]

1. The heads at paper shapes (D=768, 49 patches, up to 16 sentences per report, B=32),
   forward + backward on CPU: the batched code of `prior_dist` against the per-sample
   implementation of the same maths in `prior_dist.testing.per_sample` (Python loop over
   reports, one host transfer per sample for the matching). Target >= 5x. "Heads" here are
   sentence pooling, the report pool, SPB, global loss, local alignment and its two losses,
   matching, L_spg, L_kl and L_gpa; the two decoder *networks* (image decoder CNN, sentence
   decoder transformer) are batched layers in any implementation, so both sides receive the
   same decoder output and the image decoder is left out of this comparison.
2. The heads' share of a whole training step with the `demo` model (everything but the two
   encoders, decoders included), stages 1, 2 and 3. Target <= 15%.
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prior_dist.info import example_batch  # noqa: E402
from prior_dist.models import build_model, model_config  # noqa: E402
from prior_dist.models.features import ImageFeatures  # noqa: E402
from prior_dist.models.pooling import sentence_means  # noqa: E402
from prior_dist.task import (
    PriorTask,  # noqa: E402
    stage_plan,  # noqa: E402
)
from prior_dist.testing import per_sample  # noqa: E402


def median_time(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paper_heads_inputs(batch: int, device: torch.device, seed: int = 0) -> tuple:
    """Paper-size heads (tiny towers: they are not timed) and random encoder outputs."""
    small = model_config("tiny")
    cfg = model_config("paper").replace(image=small.image, text=small.text)
    torch.manual_seed(seed)
    model = build_model(cfg).train().to(device)
    d, patches, q, k = cfg.heads.embed_dim, 49, cfg.heads.num_queries, cfg.heads.num_prototypes
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(4, 17, (batch,), generator=g)  # 4..16 sentences per report
    tokens_per_sentence = 8
    length = 2 + 16 * tokens_per_sentence
    index = torch.full((batch, length), -1, dtype=torch.long)
    for b, n in enumerate(counts.tolist()):
        index[b, 1 : 1 + n * tokens_per_sentence] = torch.arange(n).repeat_interleave(
            tokens_per_sentence
        )
    leaves = {
        "patches": torch.randn(batch, patches, d, generator=g),
        "image_global": torch.randn(batch, d, generator=g),
        "tokens": torch.randn(batch, length, d, generator=g),
        "generated": torch.randn(batch, q, d, generator=g),
    }
    noise = {
        "sentences": torch.rand(batch, 16, k, generator=g),
        "generated": torch.rand(batch, q, k, generator=g),
    }
    move = lambda tensors: {k: v.to(device) for k, v in tensors.items()}  # noqa: E731
    return model, move(leaves), index.to(device), move(noise)


def bench_paper_heads(batch: int, repeats: int, device: torch.device) -> dict:
    model, leaves, index, noise = paper_heads_inputs(batch, device)
    plan = stage_plan(
        3,
        weights={
            3: {
                "global": 10,
                "local_image": 1,
                "local_text": 1,
                "spg": 10,
                "kl": 1,
                "gpa": 1,
                "proto": 10,
            }
        },
    )
    task = PriorTask(model)

    def fresh():
        return {k: v.clone().requires_grad_(True) for k, v in leaves.items()}

    def batched():
        x = fresh()
        sentences, mask = sentence_means(x["tokens"], index, plan.max_sentences)
        img = ImageFeatures(x["image_global"], x["patches"], (7, 7))
        out = task.head_losses(img, sentences, mask, None, plan, noise, generated=x["generated"])
        out["total"].backward()
        return out

    def looped():
        x = fresh()
        out = per_sample.heads_losses(
            model,
            x["patches"],
            x["image_global"],
            x["tokens"],
            index,
            generated=x["generated"],
            use_prototypes=True,
            sentence_cap=plan.max_sentences,
            noise_sentences=noise["sentences"],
            noise_generated=noise["generated"],
        )
        sum(plan.weights[k] * v for k, v in out.items()).backward()
        return out

    a, b = batched(), looped()
    value = lambda out, k: float(out[k].detach())  # noqa: E731
    worst = max(abs(value(a, k) - value(b, k)) / max(abs(value(b, k)), 1e-6) for k in b)
    t_batched = median_time(batched, repeats, device)
    t_looped = median_time(looped, repeats, device)
    return {
        "batch": batch,
        "batched_s": t_batched,
        "per_sample_s": t_looped,
        "speedup": t_looped / t_batched,
        "max_relative_loss_difference": worst,
    }


def bench_demo_share(batch: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config("demo")).train().to(device)
    data = {k: v.to(device) for k, v in example_batch(model, batch, 96, 8).items()}
    task = PriorTask(model)
    results = {}
    for stage in (1, 2, 3):
        plan = stage_plan(stage)

        def whole(plan=plan):
            model.zero_grad(set_to_none=True)
            task(data, plan)["total"].backward()

        def encoders_only(plan=plan):
            model.zero_grad(set_to_none=True)
            img = model.encode_image(data["image"])
            txt = model.encode_text(
                data["input_ids"],
                data["attention_mask"],
                data["sentence_index"],
                plan.max_sentences,
            )
            (img.global_embedding.sum() + img.patch_tokens.sum() + txt.sentences.sum()).backward()

        t_whole = median_time(whole, repeats, device)
        t_enc = median_time(encoders_only, repeats, device)
        results[f"stage{stage}"] = {
            "step_s": t_whole,
            "encoders_s": t_enc,
            "heads_share": max(0.0, (t_whole - t_enc) / t_whole),
        }
    img = model.encode_image(data["image"])
    tokens = img.patch_tokens.detach().requires_grad_(True)

    def image_decoder():
        model.zero_grad(set_to_none=True)
        model.reconstruct_image(tokens, tokens, img.grid).square().mean().backward()

    results["stage3"]["image_decoder_s"] = median_time(image_decoder, repeats, device)
    return {"batch": batch, **results}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--demo-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="bench/results/heads.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command: python bench/heads.py " + " ".join(sys.argv[1:]))
    print(
        f"date {date.today()}  machine {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cpus), torch {torch.__version__}, {args.threads} thread(s), "
        f"device {args.device}"
    )
    device = torch.device(args.device)
    heads = bench_paper_heads(args.batch, args.repeats, device)
    print(
        f"[1] paper heads fwd+bwd, B={heads['batch']}: "
        f"batched {heads['batched_s'] * 1e3:.1f} ms, "
        f"per-sample {heads['per_sample_s'] * 1e3:.1f} ms -> {heads['speedup']:.1f}x "
        f"(target >= 5x); losses agree to {heads['max_relative_loss_difference']:.1e}"
    )
    share = bench_demo_share(args.demo_batch, args.repeats, device)
    for stage in ("stage1", "stage2", "stage3"):
        s = share[stage]
        print(
            f"[2] demo step {stage}, B={share['batch']}: {s['step_s'] * 1e3:.1f} ms, encoders "
            f"{s['encoders_s'] * 1e3:.1f} ms -> heads {100 * s['heads_share']:.1f}% "
            "(target <= 15%)"
        )
    print(
        f"[2] of which the image decoder network (fwd+bwd) alone: "
        f"{share['stage3']['image_decoder_s'] * 1e3:.1f} ms"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"date": str(date.today()), "paper_heads": heads, "demo_share": share}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
