"""transformers' side of the Qwen2-VL SFT-step benchmark (`cargo bench -p r1-sgg --bench qwen2_vl_sft`).

    python apps/r1-sgg/scripts/qwen2_vl_sft_torch.py [--model DIR | --config FILE] [--batch FILE] [--device cpu|cuda]

The same step as the Rust bench: the model of DIR (default: the fixture's tiny untied model), or
random weights of a config.json (--config, e.g. fixtures/qwen2_vl/configs/qwen2-vl-2b-instruct.json), on
the batch of FILE (default: the fixture's reference batch: input_ids, attention_mask,
pixel_values, image_grid_thw, labels), transformers' own shifted mean cross-entropy over the
labelled tokens, backward, one AdamW step (lr 1e-5, no weight decay). Prints the median step
time over --steps steps after --warmup, and the peak memory: on CUDA the step's peak allocated
memory above the model and optimizer state; on the CPU the process's peak RSS (a coarse figure:
the allocator's pools are not the tensors).
"""

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "qwen2_vl"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE / "untied"))
    parser.add_argument("--config", help="random weights of this config.json instead of --model's")
    parser.add_argument("--batch", default=str(FIXTURE / "reference_untied.safetensors"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.config:
        config = Qwen2VLConfig.from_json_file(args.config)
        config._attn_implementation = args.attn
        # Built on the device: a real-size random init on the CPU takes minutes.
        with torch.device(args.device):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    model.to(args.device).train()
    batch = load_file(args.batch)
    ids = batch["input_ids"].to(args.device)
    inputs = dict(
        input_ids=ids,
        attention_mask=batch["attention_mask"].to(args.device),
        pixel_values=batch["pixel_values"].to(args.device, dtype),
        image_grid_thw=batch["image_grid_thw"].to(args.device),
        mm_token_type_ids=(ids == model.config.image_token_id).long(),
        labels=batch["labels"].to(args.device),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    cuda = args.device.startswith("cuda")

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 1e6
        mem = f"peak allocated above the step's start {peak:.1f} MB"
    else:
        mem = f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.1f} MB"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"transformers {args.attn} {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
        f"{params:.1f}M weights: "
        f"SFT step median {ms:.2f} ms over {args.steps} steps; {mem}"
    )


if __name__ == "__main__":
    main()
