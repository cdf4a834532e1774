#!/usr/bin/env python3
"""Side-by-side: grpo-kernels' CUDA benches against PyTorch (as trainers
write it today) and Liger-Kernel's Triton GRPO loss, on the same GPU, in the
same run.

Run on the GPU machine after the Rust benches (`bench/gpu/run.sh` does both):

    python3 benches/compare_torch.py --criterion target/criterion --out results.json

Our times are the medians criterion recorded; theirs are medians of CUDA-event
timings after warm-up, over rotating inputs. Every row also states ours as a
fraction of the memory floor, from a device-to-device copy measured here.
"""

import argparse
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

DEV = "cuda"
V = 151936


def cuda_time_ms(fn, warmup=5, reps=30):
    """Median milliseconds of fn() by CUDA events, one event pair per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ours_ms(criterion_dir, group, function, param):
    """Median of one of our criterion benches, in ms (None if absent)."""
    path = os.path.join(criterion_dir, group, function, param, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] / 1e6
    except OSError:
        return None


def copy_rate_bytes_per_ms():
    """Bytes moved (read + write) per ms by a device-to-device copy of 2 GB."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() / ms


# ------------------------------------------------------------------ PyTorch

def selective_log_softmax(logits, index):
    """TRL's memory-saving selective log-softmax: row by row for half types."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, -1) for row in logits])
    out = []
    for row_logits, row_index in zip(logits, index):
        row_logp = F.log_softmax(row_logits, dim=-1)
        out.append(row_logp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def grpo_loss_eager(logp, old, ref, adv, mask, beta=0.04, eps=0.2):
    """TRL's GRPO loss chain (k3 KL, token-level clipping, per-sequence mean)."""
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
    per_token = -torch.min(ratio * adv.unsqueeze(1), clipped * adv.unsqueeze(1)) + beta * kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    # The stats TRL logs, computed like it does.
    low = ((ratio < 1 - eps) & (adv.unsqueeze(1) < 0)).float()
    high = ((ratio > 1 + eps) & (adv.unsqueeze(1) > 0)).float()
    stats = [(x * mask).sum() / mask.sum() for x in (low, high, kl)]
    return loss, stats


def hf_sample(logits, temperature, top_k, top_p):
    """Hugging Face's warpers (temperature, top-k, top-p) then multinomial."""
    scores = logits / temperature
    if top_k:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = 0
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return torch.multinomial(scores.softmax(-1), 1)


# ------------------------------------------------------------------ cases

def rows_for(ours, theirs, floor_ms, op, size, baseline):
    return {
        "op": op,
        "size": size,
        "baseline": baseline,
        "ours_ms": ours,
        "theirs_ms": theirs,
        "speedup": (theirs / ours) if ours and theirs else None,
        "floor_ms": floor_ms,
        "ours_vs_floor": (ours / floor_ms) if ours and floor_ms else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--criterion", default="target/criterion")
    ap.add_argument("--out", default="compare.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    c = args.criterion
    rate = copy_rate_bytes_per_ms()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, d2d copy {rate * 1e3 / 1e12:.2f} TB/s")
    results = []

    # Token log-probs, bf16 [8192, V]: forward, and forward + backward.
    n = 8192
    logits = torch.randn(16, n // 16, V, device=DEV, dtype=torch.bfloat16) * 3
    ids = torch.randint(0, V, (16, n // 16), device=DEV)
    fwd = cuda_time_ms(lambda: selective_log_softmax(logits, ids))
    lg = logits.clone().requires_grad_(True)
    g = torch.randn(16, n // 16, device=DEV)

    def fwd_bwd():
        lg.grad = None
        (selective_log_softmax(lg, ids) * g).sum().backward()

    fb = cuda_time_ms(fwd_bwd, reps=10)
    bytes_ = n * V * 2
    param = f"bf16_{n}x{V}"
    # Floors: `rate` counts bytes read plus written, so a pass that reads B bytes
    # takes B / rate; forward + backward reads twice and writes once.
    results.append(rows_for(ours_ms(c, "cuda_logprob", "forward", param), fwd, bytes_ / rate,
                            "logprob forward", f"{n}x{V} bf16", "TRL selective_log_softmax"))
    results.append(rows_for(ours_ms(c, "cuda_logprob", "forward+backward_inplace", param), fb,
                            3 * bytes_ / rate, "logprob fwd+bwd", f"{n}x{V} bf16", "TRL + autograd"))
    del logits, lg

    # Logits -> GRPO loss, forward + backward: us vs the eager chain vs Liger.
    b, l = 8, 2048
    logits = (torch.randn(b, l + 1, V, device=DEV, dtype=torch.bfloat16) * 3).requires_grad_(True)
    ids = torch.randint(0, V, (b, l), device=DEV)
    old = torch.randn(b, l, device=DEV) * 0.1 - 12
    ref = old + torch.randn(b, l, device=DEV) * 0.05
    adv = torch.randn(b, device=DEV)
    mask = torch.ones(b, l, device=DEV)

    def eager():
        logits.grad = None
        logp = selective_log_softmax(logits[:, :-1], ids)
        loss, _ = grpo_loss_eager(logp, old, ref, adv, mask)
        loss.backward()

    torch.cuda.reset_peak_memory_stats()
    t_eager = cuda_time_ms(eager, warmup=2, reps=5)
    mem_eager = torch.cuda.max_memory_allocated() / 2**30
    param = f"bf16_{b * l}x{V}"
    ours = ours_ms(c, "cuda_grpo_step", "logits_to_loss_fwd_bwd", param)
    results.append(rows_for(ours, t_eager, 3 * b * l * V * 2 / rate, "GRPO step from logits",
                            f"{b}x{l}x{V} bf16", f"PyTorch eager (peak {mem_eager:.1f} GiB)"))
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger():
            logits.grad = None
            out = triton_grpo_loss(logits, old, ref, ids, adv, mask, temperature=1.0, beta=0.04, eps_low=0.2,
                                   eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()

        torch.cuda.reset_peak_memory_stats()
        t_liger = cuda_time_ms(liger, warmup=2, reps=10)
        mem_liger = torch.cuda.max_memory_allocated() / 2**30
        results.append(rows_for(ours, t_liger, 3 * b * l * V * 2 / rate, "GRPO step from logits",
                                f"{b}x{l}x{V} bf16", f"Liger triton_grpo_loss (peak {mem_liger:.1f} GiB)"))
    except Exception as e:  # noqa: BLE001 - report, don't fail the comparison
        print(f"Liger-Kernel not run: {e!r}")
    del logits

    # Policy loss + KL, forward + backward, 128 x 2048 tokens.
    b, l = 128, 2048
    logp = (torch.randn(b, l, device=DEV) * 0.1 - 2).requires_grad_(True)
    old = logp.detach() + torch.randn(b, l, device=DEV) * 0.1
    ref = logp.detach() + torch.randn(b, l, device=DEV) * 0.1
    adv = torch.randn(b, device=DEV)
    mask = (torch.rand(b, l, device=DEV) > 0.1).float()

    def chain():
        logp.grad = None
        loss, stats = grpo_loss_eager(logp, old, ref, adv, mask)
        loss.backward()

    t_chain = cuda_time_ms(chain)
    results.append(rows_for(ours_ms(c, "cuda_policy_loss", "forward+backward", f"{b * l}"), t_chain, None,
                            "policy loss + KL fwd+bwd", f"{b * l} tokens", "TRL eager chain + stats"))

    # Sampling [256, V] f32: top-k 50 + top-p 0.9, and plain temperature.
    bsz = 256
    sl = torch.randn(bsz, V, device=DEV) * 3
    t_topkp = cuda_time_ms(lambda: hf_sample(sl, 0.7, 50, 0.9))
    t_plain = cuda_time_ms(lambda: hf_sample(sl, 0.7, 0, 1.0))
    one_pass = bsz * V * 4 / rate
    results.append(rows_for(ours_ms(c, "cuda_sampling", "topk50_topp0.9", f"f32_{bsz}x{V}"), t_topkp, one_pass,
                            "sampling top-k 50 + top-p 0.9", f"{bsz}x{V} f32", "HF warpers + multinomial"))
    results.append(rows_for(ours_ms(c, "cuda_sampling", "temperature", f"f32_{bsz}x{V}"), t_plain, one_pass,
                            "sampling, temperature only", f"{bsz}x{V} f32", "softmax + multinomial"))

    # Fused linear log-probs, bf16, H = 3584: the GEMMs alone, and materialized logits.
    h = 3584
    for n in (2048, 8192):
        hid = torch.randn(n, h, device=DEV, dtype=torch.bfloat16) * 0.05
        w = torch.randn(V, h, device=DEV, dtype=torch.bfloat16) * 0.02
        ids = torch.randint(0, V, (1, n), device=DEV)
        t_gemm = cuda_time_ms(lambda: hid @ w.T, reps=10)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t_mat = cuda_time_ms(lambda: selective_log_softmax((hid @ w.T).unsqueeze(0), ids), reps=10)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        param = f"bf16_{n}x{h}x{V}"
        ours = ours_ms(c, "cuda_fused_linear", "forward", param)
        results.append(rows_for(ours, t_gemm, t_gemm, "fused linear forward", f"{n}x{h}x{V} bf16",
                                "torch GEMM alone (hidden @ W.T)"))
        results.append(rows_for(ours, t_mat, None, "fused linear forward", f"{n}x{h}x{V} bf16",
                                f"GEMM + selective log-softmax (extra {extra:.1f} GiB)"))
        # Forward + backward: the three GEMMs (logits, dh = dz W, dW = dz^T h).
        dz = torch.randn(n, V, device=DEV, dtype=torch.bfloat16)
        t_gemm3 = t_gemm + cuda_time_ms(lambda: dz @ w, reps=10) + cuda_time_ms(lambda: dz.T @ hid, reps=10)
        del dz
        ours = ours_ms(c, "cuda_fused_linear", "forward_backward", param)
        results.append(rows_for(ours, t_gemm3, t_gemm3, "fused linear fwd+bwd", f"{n}x{h}x{V} bf16",
                                "torch's 3 GEMMs alone"))
        del hid, w

    print()
    print(f"{'op':34} {'size':22} {'baseline':46} {'ours ms':>9} {'theirs ms':>10} {'speedup':>8} {'/floor':>7}")
    for r in results:
        fmt = lambda x, f: (f.format(x) if x is not None and not math.isnan(x) else "-")  # noqa: E731
        print(f"{r['op']:34} {r['size']:22} {r['baseline']:46} {fmt(r['ours_ms'], '{:9.3f}'):>9} "
              f"{fmt(r['theirs_ms'], '{:10.3f}'):>10} {fmt(r['speedup'], '{:7.1f}x'):>8} "
              f"{fmt(r['ours_vs_floor'], '{:6.2f}x'):>7}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "copy_tb_s": rate * 1e3 / 1e12, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
