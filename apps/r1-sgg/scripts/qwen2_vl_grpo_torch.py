"""The PyTorch side of one GRPO step of Qwen2-VL: transformers' `generate` and TRL's GRPO loss path.

    python apps/r1-sgg/scripts/qwen2_vl_grpo_torch.py --config CONFIG.json --batch prompts.safetensors \
        --rollouts rollouts.safetensors [--group 8] [--max-new 256] [--device cuda] [--dtype bfloat16]

The counterpart of `cargo bench -p r1-sgg --bench qwen2_vl_grpo`, on the same prompts (`--batch`, the file
`qwen2_vl_bench_batch.py` writes; its labels are ignored) and a model of the same configuration with random
weights (`--config`; `--model DIR` loads a checkpoint instead):

1. Rollout: `generate` with R1-SGG's sampling (do_sample, temperature 1.0, top-k 50, top-p 0.9),
   `num_return_sequences=G` as TRL's GRPOTrainer does without vLLM, exactly `--max-new` tokens per
   completion (min_new_tokens = max_new_tokens, as the Rust side runs without stop tokens). Prints
   generated tokens per second, best and median of `--runs`.
2. Update, on the very tensors the Rust bench sampled and scored (`--rollouts`: `completions` [B*G, C],
   `advantages` [B*G]): per prompt one micro-batch of its G rows (prompt ++ completion, the image's
   pixel values repeated per row, as TRL passes them), TRL's `_get_per_token_logps_and_entropies` math
   (`logits_to_keep = C + 1`, drop the last, `selective_log_softmax` at temperature 1: TRL's own function,
   imported from the trl wheel; its Triton kernel when available), then `_compute_loss`'s BNPO branch with
   num_iterations 1 (old log-probs = the detached ones, ratio 1), beta 0, epsilon 0.2:
   `-min(r * A, clip(r, 1 - eps, 1 + eps) * A)`, `sum(loss * mask) / sum(mask)`, divided by the micro-batches
   (gradient accumulation); gradient checkpointing on (R1-SGG's `--gradient_checkpointing true`); one AdamW step.
   `--precision autocast` (default): f32 weights under bf16 autocast, f32 gradients and moments, what
   transformers' Trainer does with `bf16=True` on one GPU (16 bytes a weight, as ours with f32 master
   weights); `--precision bf16`: bf16 weights, gradients and moments (8 bytes). Prints the update's seconds
   (best and median of `--runs`, the first left out) and peak memory (torch.cuda.max_memory_allocated).

TRL's utils module imports pandas, accelerate and datasets at the top, none of which the loss path uses:
when they are missing they are stubbed (said in the output). Needs torch, transformers, safetensors, trl.
"""

import argparse
import importlib.machinery
import sys
import time
import types

import torch
from safetensors.torch import load_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration


def trl_selective_log_softmax():
    """TRL's `selective_log_softmax`, stubbing the modules its utils import but the loss path never uses."""
    stubbed = []

    class _Any:
        def __init__(self, *args, **kwargs):
            pass

    def stub(name, **attrs):
        try:
            __import__(name)
            return
        except ImportError:
            pass
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__version__ = "0.0.0"
        sys.modules[name] = m
        stubbed.append(name)

    stub("pandas", DataFrame=_Any)
    stub("accelerate", Accelerator=_Any, PartialState=_Any)
    if "accelerate" in stubbed:
        stub("accelerate.logging", get_logger=lambda *a, **k: None)
        sys.modules["accelerate"].logging = sys.modules["accelerate.logging"]
    stub("datasets", IterableDataset=_Any, Dataset=_Any)
    import trl
    from trl.trainer.utils import selective_log_softmax

    print(f"trl {trl.__version__}" + (f" (stubbed: {', '.join(stubbed)})" if stubbed else ""))
    return selective_log_softmax


def best_median(xs, higher_is_better):
    xs = sorted(xs)
    return (xs[-1] if higher_is_better else xs[0]), xs[len(xs) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a Qwen2-VL config.json: random weights")
    parser.add_argument("--model", help="a model directory instead of --config")
    parser.add_argument("--batch", required=True, help="the prompts (qwen2_vl_bench_batch.py)")
    parser.add_argument("--rollouts", required=True, help="completions and advantages (the Rust bench's)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--precision", default="autocast", choices=["autocast", "bf16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()

    selective_log_softmax = trl_selective_log_softmax()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    low = getattr(torch, args.dtype)
    # Rollouts run in the low precision; the update keeps f32 weights under autocast.
    torch.manual_seed(0)
    if args.model:
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, dtype=low, attn_implementation=args.attn)
    else:
        cfg = Qwen2VLConfig.from_pretrained(args.config)
        cfg._attn_implementation = args.attn
        with device:  # random weights drawn on the device: a 2B model on the CPU takes a minute
            model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=low)
    model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    x = {k: v.to(device) for k, v in load_file(args.batch).items()}
    ids, mask = x["input_ids"], x["attention_mask"]
    pixels, grids = x["pixel_values"].to(low), x["image_grid_thw"]
    image = model.config.image_token_id
    b, p = ids.shape
    print(
        f"torch {torch.__version__}, {args.attn}, {device}, {params} weights: {b} prompts of {p} tokens, "
        f"G = {args.group}, {args.max_new} new tokens, T 1.0, top-k 50, top-p 0.9"
    )

    # 1. Rollouts.
    rates = []
    for run in range(args.runs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixels,
                image_grid_thw=grids,
                mm_token_type_ids=(ids == image).long(),
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=0.9,
                max_new_tokens=args.max_new,
                min_new_tokens=args.max_new,
                num_return_sequences=args.group,
                pad_token_id=0,
            )
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = (out.shape[1] - p) * out.shape[0]
        rates.append(tokens / seconds)
        print(f"  rollout run {run}: {tokens} tokens in {seconds:.2f} s")
    best, median = best_median(rates, True)
    print(f"transformers generate: best {best:.0f} tokens/s, median {median:.0f} tokens/s")

    # 2. The update on the Rust side's completions and advantages.
    r = load_file(args.rollouts)
    completions, advantages = r["completions"].to(device), r["advantages"].to(device).float()
    g, c = args.group, completions.shape[1]
    if completions.shape[0] != b * g:
        raise SystemExit(f"{completions.shape[0]} completions for {b} prompts x G = {g}")
    if args.precision == "autocast":
        model.float()
    model.train()
    # transformers 5.x names it activation checkpointing; older ones gradient checkpointing.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=6e-7, weight_decay=0.0, fused=cuda)
    patches = (grids[:, 0] * grids[:, 1] * grids[:, 2]).tolist()
    offsets = [sum(patches[:i]) for i in range(b)]
    eps = 0.2
    seconds, peaks = [], []
    for run in range(max(args.runs, 2)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        total = 0.0
        for i in range(b):
            rows = torch.cat([ids[i : i + 1].repeat(g, 1), completions[i * g : (i + 1) * g]], 1)
            row_mask = torch.cat([mask[i : i + 1].repeat(g, 1), torch.ones(g, c, dtype=mask.dtype, device=device)], 1)
            px = pixels[offsets[i] : offsets[i] + patches[i]].repeat(g, 1)
            if args.precision == "autocast":
                px = px.float()
            comp = completions[i * g : (i + 1) * g]
            comp_mask = torch.ones(g, c, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "autocast"):
                logits = model(
                    input_ids=rows,
                    attention_mask=row_mask,
                    pixel_values=px,
                    image_grid_thw=grids[i : i + 1].repeat(g, 1),
                    mm_token_type_ids=(rows == image).long(),
                    logits_to_keep=c + 1,
                ).logits
            logits = logits[:, :-1, :][:, -c:]
            logps = selective_log_softmax(logits, comp, 1.0)
            old = logps.detach()
            ratio = torch.exp(logps - old)
            adv = advantages[i * g : (i + 1) * g].unsqueeze(1)
            per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
            loss = (per_token * comp_mask).sum() / comp_mask.sum().clamp(min=1.0)
            (loss / b).backward()
            total += loss.item() / b
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        print(f"  update run {run}: loss {total:.6f}, {s:.3f} s, peak {peak:.2f} GB")
        if run > 0:
            seconds.append(s)
            peaks.append(peak)
    best, median = best_median(seconds, False)
    print(
        f"TRL GRPO update ({args.precision}): best {best:.3f} s, median {median:.3f} s, "
        f"peak allocated {max(peaks):.2f} GB"
    )


if __name__ == "__main__":
    main()
