"""Compares a file written by `r1-sgg logits` with transformers on the same inputs.

    python apps/r1-sgg/scripts/compare_logits.py --model DIR --logits FILE.safetensors

Loads DIR with transformers' Qwen2VLForConditionalGeneration (f32, CPU, eager attention),
runs it on the file's input_ids, pixel_values and image_grid_thw, and prints the max |logit
difference| and whether the position ids agree. Exits non-zero above --tolerance.
Needs `pip install torch transformers safetensors` (apps/r1-sgg/scripts/requirements-fixture.txt
pins the versions the fixture was made with).
"""

import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model directory r1-sgg read")
    parser.add_argument("--logits", required=True, help="the file r1-sgg logits wrote")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted")
    args = parser.parse_args()

    ours = load_file(args.logits)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = ours["input_ids"]
    image_token = model.config.image_token_id
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=ours["pixel_values"],
        image_grid_thw=ours["image_grid_thw"],
        # transformers 5.x finds the image blocks through the token types.
        mm_token_type_ids=(ids == image_token).long(),
    )
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            ids, inputs["mm_token_type_ids"], image_grid_thw=ours["image_grid_thw"], attention_mask=inputs["attention_mask"]
        )
        logits = model(**inputs).logits.float()
    diff = (logits - ours["logits"]).abs().max().item()
    same_positions = torch.equal(positions, ours["position_ids"])
    print(f"max |logit diff| {diff:.3e} (tolerance {args.tolerance:g}); position ids {'equal' if same_positions else 'DIFFER'}")
    sys.exit(0 if diff <= args.tolerance and same_positions else 1)


if __name__ == "__main__":
    main()
