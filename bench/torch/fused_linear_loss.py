#!/usr/bin/env python3
"""PyTorch's eager chain for the fused LM-head + GRPO loss on the CPU, on the
input files `cargo bench --bench fused_linear_loss -- --dump DIR` writes, to
set beside that bench's figures for `fused_linear_policy_loss`.

The chain is TRL's GRPO loss as `GRPOTrainer._compute_loss` writes it (f32
path of `trl.trainer.utils.selective_log_softmax`, transcribed below:
gather, then a per-row `logsumexp` loop), with eps 0.2, beta 0.04, the k3
KL and token-mean aggregation ("bnpo"/"dapo"), forward then `backward()` to
the hidden states and the LM head's weight. Outputs are compared with the
Rust run's (loss and gradient sums in meta.json) before timing.

    python3 bench/torch/fused_linear_loss.py DIR [--rounds 5] [--threads 1]

Each round is one fresh forward + backward; reports min and median seconds,
minor page faults per call (getrusage) and the process's peak RSS. For
interleaved fresh processes, run it alternately with the Rust bench.
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def selective_log_softmax(logits, index):
    # trl.trainer.utils.selective_log_softmax, float32 branch.
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
    return selected - lse


def grpo_loss(hidden, weight, targets, old, ref, adv_tok, mask, beta, eps):
    logits = hidden @ weight.T
    logp = selective_log_softmax(logits, targets)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * adv_tok, coef_2 * adv_tok)
    d = ref - logp
    per_token_loss = per_token_loss + beta * (torch.exp(d) - d - 1)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = Path(a.dir)
    meta = json.loads((d / "meta.json").read_text())
    n, h, v, t = meta["n"], meta["h"], meta["v"], meta["seq_len"]
    load = lambda name, dt: torch.from_numpy(np.fromfile(d / name, dtype=dt))
    hidden = load("hidden.f32", np.float32).reshape(n, h)
    weight = load("weight.f32", np.float32).reshape(v, h)
    targets = load("targets.u32", np.uint32).to(torch.int64)
    old, ref = load("old.f32", np.float32), load("ref.f32", np.float32)
    adv_tok = load("adv.f32", np.float32).repeat_interleave(t)
    mask = torch.ones(n)

    def step():
        hid = hidden.clone().requires_grad_(True)
        w = weight.requires_grad_(True)
        w.grad = None
        loss = grpo_loss(hid, w, targets, old, ref, adv_tok, mask, meta["beta"], meta["eps"])
        loss.backward()
        return loss.item(), hid.grad, w.grad

    loss, dh, dw = step()
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-6)
    print(f"torch loss {loss:.7g} (ours {meta['loss']:.7g}), sum dh {dh.double().sum():.6e} "
          f"(ours {meta['sum_dh']:.6e}), sum dW {dw.double().sum():.6e} (ours {meta['sum_dw']:.6e})")
    assert rel(loss, meta["loss"]) < 1e-4, "losses differ"
    times, faults = [], []
    for _ in range(a.rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"torch {torch.__version__} eager, N = {n}, H = {h}, V = {v}, f32, {a.threads} thread(s): "
          f"min {min(times) * 1e3:.1f} ms median {statistics.median(times) * 1e3:.1f} ms "
          f"minor faults/call {statistics.median(faults):.0f} peak RSS {peak / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
