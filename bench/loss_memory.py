"""Peak memory and time of LM-head + cross entropy, forward + backward: naive vs chunked.

Variants
  naive     full (tokens x vocab) logits, .float(), F.cross_entropy  (what HF models do)
  full      llmtrain.losses.token_logps_and_sum_ce(chunk_tokens=0)
  chunked   llmtrain.losses.token_logps_and_sum_ce(chunk_tokens=--chunk)

Each variant runs in a fresh subprocess so peaks do not mix. Peak memory is
  CUDA: torch.cuda.max_memory_allocated() - allocated after building the inputs
  CPU:  peak RSS (resource.getrusage ru_maxrss) - current RSS after building the inputs
so it counts what the loss adds: logits and their gradients, plus the weight gradient
(vocab x hidden, the same in every variant).

  python bench/loss_memory.py --tokens 2048          # CPU: 128k vocab fits in a few GB
  python bench/loss_memory.py                         # GPU defaults
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "full", "chunked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3: 128256)")
    p.add_argument("--tokens", type=int, default=8192, help="flattened tokens per forward (batch x seq)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the LM head input")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk for the chunked variant")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=1, help="timed forward+backward passes (after one warmup)")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set in the child process
    return p.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_now_bytes() -> int:
    """Current RSS (Linux /proc); elsewhere fall back to the high-water mark."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak_bytes()


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: build inputs, one warmup pass, then timed passes; report peak and time."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from llmtrain.losses import causal_lm_loss, token_logps_and_sum_ce

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # filled in place: a temporary here would raise the RSS high-water mark before the baseline
    hidden = torch.empty(1, args.tokens, args.hidden, device=device, dtype=dtype).normal_().requires_grad_()
    weight = torch.empty(args.vocab, args.hidden, device=device, dtype=dtype).normal_(std=0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=device)
    num_targets = args.tokens

    def step() -> float:
        if args.variant == "naive":
            logits = F.linear(hidden, weight).float()  # (1, N, V)
            loss = F.cross_entropy(logits.view(-1, args.vocab), labels.view(-1), reduction="sum") / num_targets
        else:
            chunk = 0 if args.variant == "full" else args.chunk
            token_logps, _ = token_logps_and_sum_ce(hidden, weight, labels, chunk_tokens=chunk)
            loss, _ = causal_lm_loss(token_logps, labels, num_targets)
        loss.backward()
        hidden.grad, weight.grad = None, None  # same state for every pass
        return loss.item()  # syncs the device: the timer needs the work done

    # baseline: inputs built, nothing of the loss allocated yet
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_now_bytes()  # peak RSS later minus RSS now = what the loss added
    loss = step()  # warmup (allocator, kernels); also the peak-memory pass
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_peak_bytes()) - base
    return {"variant": args.variant, "loss": loss, "peak_bytes": peak, "seconds": min(times)}


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", variant, "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])

    gib = 1024**3
    logits_gib = args.tokens * args.vocab * 4 / gib
    print(
        f"device={args.device} vocab={args.vocab} tokens={args.tokens} hidden={args.hidden} "
        f"chunk={args.chunk} dtype={args.dtype} repeats={args.repeats}"
    )
    print(f"one fp32 (tokens x vocab) logits tensor = {logits_gib:.2f} GiB; weight grad = "
          f"{args.vocab * args.hidden * getattr(__import__('torch'), args.dtype).itemsize / gib:.2f} GiB")
    memory_kind = "peak alloc" if args.device == "cuda" else "peak RSS"
    print(f"| variant | loss | {memory_kind} over inputs (GiB) | fwd+bwd (s) | memory vs naive | time vs naive |")
    print("| --- | --- | --- | --- | --- | --- |")
    naive = results["naive"]
    for variant in VARIANTS:
        r = results[variant]
        print(
            f"| {variant} | {r['loss']:.5f} | {r['peak_bytes'] / gib:.3f} | {r['seconds']:.2f} | "
            f"{r['peak_bytes'] / naive['peak_bytes']:.3f}x | {r['seconds'] / naive['seconds']:.2f}x |"
        )
    reduction = naive["peak_bytes"] / max(results["chunked"]["peak_bytes"], 1)
    print(f"goal (issue 8): chunked peak >= 4x lower than naive at vocab 128k, 8k tokens per row -> "
          f"{reduction:.1f}x lower here ({'met' if reduction >= 4 else 'NOT met'}; vocab={args.vocab}, tokens={args.tokens})")


if __name__ == "__main__":
    main()
