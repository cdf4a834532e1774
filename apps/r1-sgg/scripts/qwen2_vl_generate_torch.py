"""transformers' `generate` on the prompts `cargo bench -p r1-sgg --bench qwen2_vl_generate` wrote.

    python apps/r1-sgg/scripts/qwen2_vl_generate_torch.py --model apps/r1-sgg/fixtures/qwen2_vl/untied \
        --inputs /tmp/prompts.safetensors --group 8 --max-new 128

Loads the model with Qwen2VLForConditionalGeneration (f32, CPU, `--attn` sdpa or eager),
and samples `--group` completions per prompt from the same left-padded input ids, attention
mask, pixel values and grids with R1-SGG's GRPO settings (do_sample, temperature 1.0, top-k 50,
top-p 0.9, stop at <|im_end|> or <|endoftext|>, `--max-new` tokens), through
`num_return_sequences` as TRL's GRPOTrainer does without vLLM. Prints generated tokens per second
(tokens up to and including each completion's stop token), best and median of `--runs`.
Needs `pip install torch transformers safetensors`.
"""

import argparse
import time

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True, help="the file the bench wrote (INPUTS=...)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation=args.attn
    ).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    stop = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")})
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    x = load_file(args.inputs)
    ids = x["input_ids"]
    inputs = dict(
        input_ids=ids,
        attention_mask=x["attention_mask"],
        pixel_values=x["pixel_values"],
        image_grid_thw=x["image_grid_thw"],
        mm_token_type_ids=(ids == model.config.image_token_id).long(),
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.attn} attention; "
        f"{ids.shape[0]} prompts of {ids.shape[1]} tokens"
    )
    rates = []
    for run in range(args.runs):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=0.9,
                max_new_tokens=args.max_new,
                num_return_sequences=args.group,
                eos_token_id=stop,
                pad_token_id=pad,
            )
        seconds = time.perf_counter() - start
        completions = out[:, ids.shape[1]:]
        tokens = 0
        for row in completions.tolist():
            n = len(row)
            for i, t in enumerate(row):
                if t in stop:
                    n = i + 1
                    break
            tokens += n
        rates.append(tokens / seconds)
        print(f"  run {run}: {tokens} tokens in {seconds:.2f} s")
    rates.sort()
    print(f"transformers generate: best {rates[-1]:.0f} tokens/s, median {rates[len(rates) // 2]:.0f} tokens/s")


if __name__ == "__main__":
    main()
