#!/usr/bin/env python3
"""PyTorch's side of `benches/versus_torch.rs`: each case of that bench,
written as TRL 1.16 and transformers 5.25 write the op, on the input files
`cargo bench --bench versus_torch -- --dump DIR` wrote, eager, on the CPU.

    python3 bench/torch/versus.py DIR [--case NAME] [--threads N] [--rounds R]
    python3 bench/torch/versus.py --report RESULTS.jsonl --meta DIR/meta.json [--csv FILE --source PATH]

Each case runs once untimed; its outputs are compared with ours (dumped
beside the inputs) and a mismatch exits with status 1 before anything is
timed. Then R timed calls (R = 0: compare only; no --case: every case),
and one JSON line per case, keyed as the Rust side's: min and median
seconds per call, minor page faults per call (median of getrusage
ru_minflt deltas), RSS before loading (start_rss; torch, TRL and
transformers already imported) and peak RSS (ru_maxrss), and the f64 sum
of the outputs (checksum).

The cases, PyTorch's side (`torch.set_num_threads(N)`):
- logprob_*: `trl.trainer.utils.selective_log_softmax(logits, targets)` on
  logits shaped [B, T, V] as TRL passes them (its f32 branch: gather and a
  logsumexp per sequence; bf16: log_softmax per sequence); forward under
  `torch.no_grad()` (as TRL computes old and reference log-probs), fwd+bwd
  with the logits a leaf and `logp.backward(grad)`, `.grad` reset to None
  each call (`zero_grad(set_to_none=True)`).
- fused_linear_*: the LM head as `F.linear(hidden, weight)` (nn.Linear, no
  bias), then the same; fwd+bwd to `hidden` and `weight`.
- fused_linear_loss_fwd_bwd: LM head, selective_log_softmax, and the loss
  lines of `GRPOTrainer._compute_loss` (token ratios, k3 KL, beta 0.04,
  eps 0.2, loss_type "bnpo": token mean), `loss.backward()`.
- kl_k3_*: `_compute_loss`'s per_token_kl line; fwd+bwd `backward(grad)`.
- policy_loss_*: `_compute_loss`'s loss lines, loss_type "grpo" (the
  sequence mean of token means, as our default aggregation), with the
  completion mask; forward under no_grad, fwd+bwd `loss.backward()` to
  the log-probs. TRL's logged metrics (clip ratios, KL mean) are not
  computed here; ours computes its statistics in the same call.
- sample: one step of transformers' `generate(do_sample=True)`: the last
  logits copied to f32 (`.to(copy=True, dtype=torch.float32)`), the logits
  processors `generate` builds for temperature 0.7, top-k 50, top-p 0.9
  (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), softmax,
  `torch.multinomial(probs, 1)`.
- advantages: `_generate_and_score_completions`' advantage lines for one
  reward function, scale_rewards "group", with TRL's `nanstd`.

TRL's loss and advantage lines are transcribed (they sit inside methods
that need a trainer); run on every case (no --case), the script checks that
each transcribed line occurs verbatim in the installed TRL's source, so a
TRL that changes them fails loudly.

Tolerances (ours against PyTorch, per output array): f32, the largest
absolute error over the largest magnitude <= 1e-4 and the summed absolute
error over the summed magnitude (L1) <= 1e-4; bf16 (TRL's bf16 branch
returns bf16 log-probs, and its gradient is computed from them): 2e-2 and
5e-2. Sampling draws from different random streams: each of our tokens
must be one the transformers processors keep (a finite score), and our
log-prob of it must match log_softmax(z / T) at f32 tolerance. Arrays over
4 Mi elements are compared on the 16 rows the Rust side dumped.

--report renders the driver's results (one JSON line per process, each with
a `round`) into a markdown table and, with --csv, appends rows to
bench/data/kernels.csv; it needs only the standard library.
"""

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOL = {"f32": (1e-4, 1e-4), "bf16": (2e-2, 5e-2)}

# The loss lines of GRPOTrainer._compute_loss this script transcribes
# (checked verbatim against the installed TRL's source, whitespace aside).
TRL_LOSS_LINES = [
    "log_ratio = per_token_logps - old_per_token_logps",
    "coef_1 = torch.exp(log_importance_weights)",
    "torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1",
    "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",
    "per_token_loss1 = coef_1 * advantages",
    "per_token_loss2 = coef_2 * advantages",
    "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)",
    "per_token_loss = per_token_loss + self.beta * per_token_kl",
    "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
    "loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)",
]
TRL_ADVANTAGE_LINES = [
    "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
    "mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)",
    "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
    "std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)",
    "advantages = rewards - mean_grouped_rewards",
    "advantages = advantages / (std_rewards + 1e-4)",
    "is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))",
    "advantages = torch.nan_to_num(advantages, nan=0.0)",
]


def check_trl_source():
    from trl.trainer.grpo_trainer import GRPOTrainer

    squash = lambda s: "".join(s.split())
    for method, lines in ((GRPOTrainer._compute_loss, TRL_LOSS_LINES),
                          (GRPOTrainer._generate_and_score_completions, TRL_ADVANTAGE_LINES)):
        src = squash(inspect.getsource(method))
        missing = [l for l in lines if squash(l) not in src]
        if missing:
            sys.exit(f"TRL's {method.__name__} no longer holds these transcribed lines: {missing}")


# ---------------------------------------------------------------- the cases

def grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, p, loss_type):
    """GRPOTrainer._compute_loss (TRL 1.16), importance_sampling_level "token",
    beta != 0, loss_type "grpo" or "bnpo"; `advantages` is [B]."""
    import torch

    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    log_importance_weights = log_ratio
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = (
        torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    )
    coef_2 = torch.clamp(coef_1, 1 - p["eps"], 1 + p["eps"])
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_loss = per_token_loss + p["beta"] * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # bnpo
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, per_token_loss


def build(case, meta, d):
    """(step, check): `step()` runs PyTorch's side once and returns its
    outputs by name; `check(outputs)` compares them with ours."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import nanstd, selective_log_softmax

    s, p, name = meta["sizes"], meta["params"], case["name"]

    def load(file):
        ext = file.rsplit(".", 1)[1]
        a = np.fromfile(d / file, dtype={"f32": np.float32, "u32": np.uint32, "u8": np.uint8, "bf16": np.int16}[ext])
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if ext == "bf16" else t

    check = lambda out: compare(case, d, out)
    if name.startswith("logprob_"):
        bf16, backward = name.endswith("bf16"), "_bwd" in name
        b, t, v = s["lp_batch"], s["lp_seq"], s["vocab"]
        logits = load("logprob.logits.bf16" if bf16 else "logprob.logits.f32").view(b, t, v)
        targets = load("logprob.targets.u32").to(torch.int64).view(b, t)
        grad = load("logprob.grad.f32").view(b, t).to(logits.dtype)

        def step():
            if not backward:
                with torch.no_grad():
                    return {"logp": selective_log_softmax(logits, targets)}
            x = logits.requires_grad_(True)
            x.grad = None
            logp = selective_log_softmax(x, targets)
            logp.backward(grad)
            return {"logp": logp.detach(), "dlogits": x.grad}

    elif name.startswith("fused_linear"):
        n, h, v, t = s["fl_rows"], s["hidden"], s["vocab"], s["fl_seq"]
        hidden = load("fused.hidden.f32").view(n // t, t, h)
        weight = load("fused.weight.f32").view(v, h)
        targets = load("fused.targets.u32").to(torch.int64).view(n // t, t)
        if name == "fused_linear_loss_fwd_bwd":
            old, ref = load("fused.old.f32").view(n // t, t), load("fused.ref.f32").view(n // t, t)
            adv, mask = load("fused.adv.f32"), torch.ones(n // t, t)

            def step():
                hid, w = hidden.detach().requires_grad_(True), weight.requires_grad_(True)
                w.grad = None
                logits = F.linear(hid, w)
                per_token_logps = selective_log_softmax(logits, targets)
                loss, _ = grpo_loss(per_token_logps, old, ref, adv, mask, p, "bnpo")
                loss.backward()
                return {"loss": loss.detach().reshape(1), "dhidden": hid.grad, "dweight": w.grad}
        else:
            backward = name.endswith("_bwd")
            grad = load("fused.grad.f32").view(n // t, t)

            def step():
                if not backward:
                    with torch.no_grad():
                        return {"logp": selective_log_softmax(F.linear(hidden, weight), targets)}
                hid, w = hidden.detach().requires_grad_(True), weight.requires_grad_(True)
                w.grad = None
                logp = selective_log_softmax(F.linear(hid, w), targets)
                logp.backward(grad)
                return {"logp": logp.detach(), "dhidden": hid.grad, "dweight": w.grad}

    elif name.startswith("kl_k3") or name.startswith("policy_loss"):
        bsz, t = s["seqs"], s["seq_len"]
        logp = load("tokens.logp.f32").view(bsz, t)
        ref_per_token_logps = load("tokens.ref.f32").view(bsz, t)
        backward = name.endswith("_bwd")
        if name.startswith("kl_k3"):
            grad = load("tokens.grad.f32").view(bsz, t)

            def step():
                with torch.set_grad_enabled(backward):
                    per_token_logps = logp.detach().requires_grad_(backward)
                    per_token_kl = (
                        torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
                    )
                    if not backward:
                        return {"kl": per_token_kl}
                    per_token_kl.backward(grad)
                    return {"kl": per_token_kl.detach(), "dlogp": per_token_logps.grad}
        else:
            old = load("tokens.old.f32").view(bsz, t)
            adv, mask = load("tokens.adv.f32"), load("tokens.mask.u8").view(bsz, t).float()

            def step():
                with torch.set_grad_enabled(backward):
                    per_token_logps = logp.detach().requires_grad_(backward)
                    loss, per_token_loss = grpo_loss(per_token_logps, old, ref_per_token_logps, adv, mask, p, "grpo")
                    out = {"loss": loss.detach().reshape(1), "per_token": (per_token_loss * mask).detach()}
                    if backward:
                        loss.backward()
                        out["dlogp"] = per_token_logps.grad
                    return out

    elif name == "sample":
        from transformers.generation.logits_process import (
            LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        rows, v = s["sample_rows"], s["vocab"]
        last_logits = load("sample.logits.f32").view(rows, 1, v)  # outputs.logits[:, -1] of one step
        input_ids = torch.zeros(rows, 1, dtype=torch.long)
        logits_processor = LogitsProcessorList([
            TemperatureLogitsWarper(p["temperature"]),
            TopKLogitsWarper(top_k=p["top_k"], min_tokens_to_keep=1),
            TopPLogitsWarper(top_p=p["top_p"], min_tokens_to_keep=1),
        ])

        def step():
            with torch.no_grad():
                next_token_logits = last_logits[:, -1].to(copy=True, dtype=torch.float32)
                next_token_scores = logits_processor(input_ids, next_token_logits)
                probs = F.softmax(next_token_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
                return {"tokens": next_tokens, "scores": next_token_scores}

        def check(out):
            scores = out["scores"]
            ours = {o["name"]: np.fromfile(d / o["file"], np.float32) for o in case["outputs"]}
            tokens = torch.from_numpy(ours["tokens"].astype(np.int64))
            kept = torch.isfinite(scores.gather(1, tokens[:, None])).squeeze(1)
            if not bool(kept.all()):
                fail(name, f"our tokens {tokens[~kept].tolist()} (rows {torch.nonzero(~kept).flatten().tolist()}) "
                           "are outside the set transformers' processors keep")
            want = F.log_softmax(last_logits[:, -1] / p["temperature"], dim=-1).gather(1, tokens[:, None]).squeeze(1)
            report(name, "tokens", "every one kept by transformers' processors", True)
            errs(name, "logp", ours["logp"], want.numpy(), "f32")

    elif name == "advantages":
        rewards_per_func = load("rewards.f32").view(-1, 1)
        reward_weights = torch.ones(1)
        num_generations = s["group"]

        def step():
            rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
            unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
            rewards[unscorable_mask] = torch.nan
            mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
            mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            advantages = rewards - mean_grouped_rewards
            advantages = advantages / (std_rewards + p["adv_eps"])
            is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # noqa: F841 (TRL logs it)
            advantages = torch.nan_to_num(advantages, nan=0.0)
            return {"advantages": advantages}
    else:
        sys.exit(f"no case {name!r} in bench/torch/versus.py")
    return step, check


# ---------------------------------------------------------------- comparison

def fail(case, msg):
    print(f"MISMATCH {case}: {msg}", flush=True)
    sys.exit(1)


def report(case, name, what, ok):
    print(f"  {case:<26} {name:<10} {what} {'ok' if ok else 'FAILED'}", flush=True)


def errs(case, name, ours, theirs, dtype):
    import numpy as np

    a, b = np.asarray(ours, np.float64).ravel(), np.asarray(theirs, np.float64).ravel()
    if a.shape != b.shape:
        fail(case, f"{name}: {a.size} values, PyTorch {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        fail(case, f"{name}: non-finite values (ours {int((~np.isfinite(a)).sum())}, PyTorch {int((~np.isfinite(b)).sum())})")
    d = np.abs(a - b)
    e_max = d.max() / max(np.abs(b).max(), 1e-30)
    e_l1 = d.sum() / max(np.abs(b).sum(), 1e-30)
    tol_max, tol_l1 = TOL[dtype]
    ok = e_max <= tol_max and e_l1 <= tol_l1
    report(case, name, f"max err / max |x| {e_max:.2e} (<= {tol_max:g}), L1 err / L1 |x| {e_l1:.2e} (<= {tol_l1:g})", ok)
    if not ok:
        fail(case, f"{name} differs from PyTorch's beyond the tolerance")


def compare(case, d, out):
    import numpy as np

    for o in case["outputs"]:
        ours = np.fromfile(d / o["file"], np.float32)
        t = out[o["name"]].detach().float().reshape(o["shape"])
        if o["rows"] is not None:
            t = t[o["rows"]]
        errs(case["name"], o["name"], ours, t.numpy(), case["dtype"])


def checksum(out):
    return sum(float(v.detach().double().sum()) for k, v in out.items() if k != "scores")


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(args):
    import torch
    import transformers.generation.logits_process  # noqa: F401 (imported before start_rss is read)
    import trl.trainer.utils  # noqa: F401

    torch.set_num_threads(args.threads)
    d = Path(args.dir)
    meta = json.loads((d / "meta.json").read_text())
    if args.case is None:
        check_trl_source()  # importing the trainer takes seconds: once, in the all-cases pass
    cases = [c for c in meta["cases"] if args.case in (None, c["name"])]
    if not cases:
        sys.exit(f"no case {args.case!r} in {d / 'meta.json'}")
    for case in cases:
        start_rss = rss_now()
        step, check = build(case, meta, d)
        out = step()
        check(out)
        total = checksum(out)
        del out, check
        times, faults = [], []
        for _ in range(args.rounds):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if args.rounds:
            print(json.dumps({
                "case": case["name"], "impl": "torch", "torch": torch.__version__.split("+")[0],
                "threads": args.threads, "rounds": args.rounds, "min_s": min(times),
                "median_s": statistics.median(times), "faults_per_call": statistics.median(faults),
                "start_rss": start_rss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "checksum": total}), flush=True)
        del step  # this case's tensors go before the next case loads its own
    if not args.rounds:
        print(f"all {len(cases)} case(s) agree with PyTorch {torch.__version__} within the tolerances")


# ---------------------------------------------------------------- report

def t3(s):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if s >= scale or unit == "ns":
            v = s / scale
            return f"{v:.0f} {unit}" if v >= 99.95 else f"{v:.1f} {unit}" if v >= 9.995 else f"{v:.2f} {unit}"


def rss(a):
    """Peak RSS, and the RSS the process had before loading the case."""
    return f"{a['peak'] / 1e6:.0f} MB ({a['start'] / 1e6:.0f} at start)"


def cpu_model():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    return f"{model} ({os.cpu_count()} cores)"


def render_report(args):
    import csv
    import datetime

    meta = json.loads(Path(args.meta).read_text())
    cases = {c["name"]: c for c in meta["cases"]}
    res = [json.loads(l) for l in Path(args.report).read_text().splitlines() if l.startswith("{")]
    keys = list(dict.fromkeys((r["case"], r["threads"]) for r in res))
    torch_version = next((r["torch"] for r in res if r["impl"] == "torch"), "?")
    print(f"| case | size | our form | threads | ours min | ours median | torch min | torch median "
          f"| torch / ours (median) | faults/call ours | faults/call torch | peak RSS ours | peak RSS torch |")
    print("|" + "---|" * 13)
    agg = {}
    for key in keys:
        side = {i: [r for r in res if (r["case"], r["threads"]) == key and r["impl"] == i] for i in ("ours", "torch")}
        if not side["ours"] or not side["torch"]:
            continue
        a = {i: {"min": min(r["min_s"] for r in rs), "median": statistics.median(r["median_s"] for r in rs),
                 "faults": statistics.median(r["faults_per_call"] for r in rs), "peak": max(r["peak_rss"] for r in rs),
                 "start": statistics.median(r["start_rss"] for r in rs)}
             for i, rs in side.items()}
        # The ratio of each round's pair of fresh processes, then their median.
        paired = [t["median_s"] / o["median_s"] for o in side["ours"] for t in side["torch"] if o["round"] == t["round"]]
        ratio = statistics.median(paired) if paired else a["torch"]["median"] / a["ours"]["median"]
        c = cases[key[0]]
        agg[key] = a
        print(f"| {key[0]} | {c['shape']} {c['dtype']} | `{c['form']}` | {key[1]} | {t3(a['ours']['min'])} "
              f"| {t3(a['ours']['median'])} | {t3(a['torch']['min'])} | {t3(a['torch']['median'])} | {ratio:.2f}x "
              f"| {a['ours']['faults']:.0f} | {a['torch']['faults']:.0f} | {rss(a['ours'])} | {rss(a['torch'])} |")
    rounds = len({r["round"] for r in res})
    print(f"\nPyTorch {torch_version} eager, {rounds} round(s) of fresh processes, {cpu_model()}")
    if not args.csv:
        return
    commit = args.commit
    if not commit:  # the tree now, which is the one measured only if nothing changed since
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        commit += "+" if dirty.strip() else ""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with open(args.csv, "a", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        for (name, threads), a in agg.items():
            c = cases[name]
            for side, impl in (("ours", f"ours ({c['form']})"), ("torch", f"PyTorch {torch_version} eager")):
                for stat in ("median", "min"):
                    w.writerow([date, commit, cpu_model(), "", threads, c["op"], c["dtype"], c["shape"], impl, stat,
                                f"{a[side][stat] * 1e6:.7g}", "", "", a[side]["peak"], args.source])
    print(f"rows appended to {args.csv}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--report", help="results JSONL of bench/cpu_versus_torch.sh")
    ap.add_argument("--meta", help="with --report: the dump's meta.json")
    ap.add_argument("--csv", help="with --report: append rows to this kernels.csv")
    ap.add_argument("--source", default="", help="with --csv: the file the rows cite")
    ap.add_argument("--commit", help="with --csv: the commit measured (default: HEAD now)")
    args = ap.parse_args()
    if args.report:
        render_report(args)
    elif args.dir:
        run(args)
    else:
        ap.error("DIR or --report is required")


if __name__ == "__main__":
    main()
