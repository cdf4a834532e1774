"""Writes a synthetic SFT batch for a Qwen2-VL configuration, for the SFT-step benchmarks.

    python apps/r1-sgg/scripts/qwen2_vl_bench_batch.py --config CONFIG.json --out batch.safetensors \
        [--samples 8] [--tokens 1024] [--image-side 448] [--seed 0]

Each sample: text tokens, one image (`<|vision_start|>`, one `<|image_pad|>` per merged patch,
`<|vision_end|>`), more text up to --tokens in all; the second half of the text after the image
is the answer (labels), everything else -100. Token ids are drawn below the special tokens;
pixel values are N(0, 1) (the processor's output is normalized). The layout is the fixture's
reference batch (`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, `labels`), which
`cargo bench -p r1-sgg --bench qwen2_vl_sft` (QWEN2VL_BENCH_BATCH) and
`scripts/qwen2_vl_sft_torch.py --batch` read. Needs torch and safetensors.
"""

import argparse
import json

import torch
from safetensors.torch import save_file


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a Qwen2-VL config.json (flat or nested)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sample, image included")
    parser.add_argument("--image-side", type=int, default=448, help="pixels; a multiple of patch * merge")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = json.load(open(args.config))
    text = cfg.get("text_config", cfg)
    vision = cfg.get("vision_config", {})
    patch = vision.get("patch_size", vision.get("spatial_patch_size", 14))
    merge = vision.get("spatial_merge_size", 2)
    temporal = vision.get("temporal_patch_size", 2)
    channels = vision.get("in_channels", vision.get("in_chans", 3))
    if args.image_side % (patch * merge):
        raise SystemExit(f"--image-side must be a multiple of {patch * merge}")
    grid = args.image_side // patch
    image_tokens = grid * grid // (merge * merge)
    prefix = 16
    answer_start = prefix + image_tokens + 2
    if args.tokens <= answer_start + 2:
        raise SystemExit(f"--tokens must exceed {answer_start + 2} for this image")

    g = torch.Generator().manual_seed(args.seed)
    # Ordinary tokens: below the first special id of the config.
    specials = [cfg[k] for k in ("vision_start_token_id", "image_token_id", "vision_end_token_id")]
    plain = min(min(specials), text["vocab_size"]) - 16
    ids = torch.randint(0, plain, (args.samples, args.tokens), generator=g)
    ids[:, prefix] = cfg["vision_start_token_id"]
    ids[:, prefix + 1 : prefix + 1 + image_tokens] = cfg["image_token_id"]
    ids[:, prefix + 1 + image_tokens] = cfg["vision_end_token_id"]
    labels = torch.full_like(ids, -100)
    answer = answer_start + (args.tokens - answer_start) // 2
    labels[:, answer:] = ids[:, answer:]
    patches = args.samples * grid * grid
    tensors = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(patches, channels * temporal * patch * patch, generator=g),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * args.samples),
    }
    save_file(tensors, args.out)
    print(
        f"{args.out}: {args.samples} samples x {args.tokens} tokens ({image_tokens} image tokens, "
        f"{args.tokens - answer} answer tokens each), {patches} patches"
    )


if __name__ == "__main__":
    main()
