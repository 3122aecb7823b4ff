#!/usr/bin/env python3
"""PyTorch baseline for the captioner's decoder: Hugging Face `LlamaForCausalLM` on one device.

Measures, for each batch size, on random prompt embeddings of the captioner's shape
(`--prompt-tokens`, by default 31 = 30 text tokens + 1 pooled audio embedding, fed as
`inputs_embeds` like our engine feeds the decoder):

- prefill: one forward over the prompt with a KV cache, last position's logits and their
  argmax; batch·prompt tokens/s;
- generate: `model.generate` of exactly N greedy tokens per row (`min_new_tokens = N`);
  batch·N tokens/s, prefill included;
- decode: the incremental steps of that generation, batch·(N−1)/(t_generate − mean t_prefill)
  tokens/s;
- decoder_clips: batch/t_generate, i.e. captions/s of the decoder alone (no front end, no
  encoder, no detokenising);
- peak_memory (with --peak-memory, CUDA only): torch.cuda.max_memory_allocated per batch size.

Each figure has warm-up runs and then `--repetitions` timed runs (mean, min, max). These are
the definitions of `audiocap bench` (src/bench/measure.rs), so its "prefill", "decode" and
"generate" figures compare directly. `audiocap bench --preset real --device cuda` writes the
same-shaped (Llama-3-8B) random checkpoint in WORK/sources/real-seed1/llm; point --llm at it:

    python3 benchmarks/pytorch_captioner.py --llm WORK/sources/real-seed1/llm --json pt.json

`audiocap bench`'s "end_to_end" figure (captions/s = batch/t) also pays for the front end, the
encoder and detokenising; decoder_clips here is the same rate for the decoder alone, so it bounds
what a PyTorch captioner could reach end to end. Needs torch, transformers and safetensors; no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# Everything is local; never let the Hugging Face libraries reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
GIB = 1024**3


class UsageError(Exception):
    """A problem with the command line or the model directory (exit code 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Decoder throughput of a Hugging Face Llama directory under PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--llm", required=True, type=Path, help="Hugging Face Llama directory")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weights and activations (default: f16 on cuda, f32 on cpu)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=31, help="prompt length P")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens generated per row, N")
    p.add_argument("--repetitions", type=int, default=3, help="timed runs per figure")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel")
    p.add_argument("--seed", type=int, default=1, help="seed of the random prompt embeddings")
    p.add_argument("--peak-memory", action="store_true", help="report peak CUDA memory per batch")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated integers")
    problems = []
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        problems.append("--batch-sizes: give at least one batch size, each >= 1")
    for name in ("prompt_tokens", "new_tokens", "repetitions"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if problems:
        raise UsageError("; ".join(problems))
    return args


def check_llm_dir(path: Path) -> dict:
    """Fails with a message naming `path` unless it looks like a Hugging Face Llama directory."""
    if not path.exists():
        raise UsageError(f"--llm {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"--llm {path}: not a directory")
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--llm {path}: no config.json (not a Hugging Face model directory)")
    except (OSError, ValueError) as e:
        raise UsageError(f"--llm {path}: cannot read {config_path.name}: {e}")
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise UsageError(f"--llm {path}: config.json has model_type {kind!r}, not 'llama'")
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"--llm {path}: no *.safetensors weights")
    return config


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def load_model(args: argparse.Namespace, torch, transformers):
    """`LlamaForCausalLM.from_pretrained` onto the device, in eval mode; (model, seconds)."""
    dtype = getattr(torch, DTYPES[args.dtype])
    kwargs = {"attn_implementation": args.attn}
    tf_version = version_tuple(transformers.__version__)
    # `torch_dtype` was renamed `dtype` in 4.56; the old name only warns in 5.x, but older
    # releases silently ignore the new one, so pick by version.
    kwargs["dtype" if tf_version >= (4, 56) else "torch_dtype"] = dtype
    # device_map loads the weights straight onto the device but needs accelerate (transformers
    # 4 and 5 alike); without it, load on the CPU and move.
    direct = args.device != "cpu" and importlib.util.find_spec("accelerate") is not None
    if direct:
        kwargs["device_map"] = args.device
    start = time.perf_counter()
    try:
        model, info = transformers.LlamaForCausalLM.from_pretrained(
            str(args.llm), output_loading_info=True, **kwargs
        )
    except Exception as e:  # safetensors, JSON and shape errors have no common base class
        raise UsageError(f"--llm {args.llm}: cannot load the model: {type(e).__name__}: {e}")
    # from_pretrained initialises missing weights at random and goes on: refuse that here.
    bad = sorted(info.get("missing_keys", [])) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])
    )
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UsageError(f"--llm {args.llm}: weights missing or of the wrong shape: {shown}")
    if not direct:
        model = model.to(args.device)
    if model.dtype != dtype:
        model = model.to(dtype)
    model.eval()
    sync(torch, args.device)
    return model, time.perf_counter() - start


def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def logits_kwargs(model) -> dict:
    """Keep only the last position's logits, whatever this transformers calls it."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:  # transformers >= 4.50
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:  # 4.45 ... 4.49
        return {"num_logits_to_keep": 1}
    return {}  # older: logits for every position; prefill() takes the last


def stop_ids(model) -> tuple[list[int], int]:
    """(eos ids, pad id) from the checkpoint's generation config, then its model config."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        eos = []
    eos = [eos] if isinstance(eos, int) else list(eos)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, pad


def summarise(name: str, batch: int, unit: str, values: list[float], seconds=None) -> dict:
    figure = {
        "name": name,
        "batch": batch,
        "unit": unit,
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }
    if seconds is not None:
        figure["seconds"] = seconds
    return figure


def measure_batch(args, torch, model, batch: int, scale: float) -> list[dict]:
    """Prefill and fixed-length greedy generation for one batch size."""
    device, p, n = args.device, args.prompt_tokens, args.new_tokens
    hidden = model.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed + batch)
    embeds = (torch.randn(batch, p, hidden, generator=gen) * scale).to(device, model.dtype)
    mask = torch.ones(batch, p, dtype=torch.long, device=device)
    keep = logits_kwargs(model)
    eos, pad = stop_ids(model)

    def prefill():
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **keep)
        return out.logits[:, -1, :].argmax(dim=-1)

    def generate():
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        # With inputs_embeds and no input_ids, decoder-only models return only the new tokens.
        if tuple(out.shape) != (batch, n):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(batch, n)}")
        return out

    def timed(fn) -> list[float]:
        for _ in range(args.warmup):
            fn()
        sync(torch, device)
        seconds = []
        for _ in range(args.repetitions):
            start = time.perf_counter()
            fn()
            sync(torch, device)
            seconds.append(time.perf_counter() - start)
        return seconds

    if args.peak_memory and device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_prefill = timed(prefill)
    t_generate = timed(generate)
    t_prefill_mean = sum(t_prefill) / len(t_prefill)

    figures = [
        summarise("prefill", batch, "tokens/s", [batch * p / t for t in t_prefill], t_prefill)
    ]
    if n >= 2:
        decode = [batch * (n - 1) / max(t - t_prefill_mean, 1e-9) for t in t_generate]
        figures.append(summarise("decode", batch, "tokens/s", decode, t_generate))
    figures.append(
        summarise("generate", batch, "tokens/s", [batch * n / t for t in t_generate], t_generate)
    )
    figures.append(
        summarise("decoder_clips", batch, "clips/s", [batch / t for t in t_generate], t_generate)
    )
    if args.peak_memory and device == "cuda":
        peak = torch.cuda.max_memory_allocated() / GIB
        figures.append(summarise("peak_memory", batch, "GiB", [peak]))
    return figures


def fmt(x: float) -> str:
    """Three significant figures, whole numbers from 1000 up (as benchmarks/RESULTS.md)."""
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}"


def print_report(result: dict) -> None:
    v = result["versions"]
    print(f"device: {result['device']}")
    print(f"torch {v['torch']}, transformers {v['transformers']}, python {v['python']}")
    print(
        f"dtype {result['dtype']}, attention {result['attn']}, "
        f"{result['parameters']:,} parameters ({result['parameters'] / 1e9:.2f} B), "
        f"load {result['load_s']:.1f} s"
    )
    s = result["settings"]
    print(
        f"prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, "
        f"{s['warmup']} warm-up + {s['repetitions']} timed runs"
    )
    print()
    print("| figure | batch | mean | min–max | unit |")
    print("|---|---|---|---|---|")
    for f in result["figures"]:
        spread = f"{fmt(f['min'])}–{fmt(f['max'])}"
        print(f"| {f['name']} | {f['batch']} | {fmt(f['mean'])} | {spread} | {f['unit']} |")
    for batch, error in result.get("skipped", {}).items():
        print(f"batch {batch}: skipped ({error})")


def run(args: argparse.Namespace) -> dict:
    check_llm_dir(args.llm)
    import torch
    import transformers

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    if args.dtype is None:
        args.dtype = "f16" if args.device == "cuda" else "f32"

    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, threads: {torch.get_num_threads()})"

    if args.peak_memory and args.device != "cuda":
        print("note: --peak-memory is measured on cuda only", file=sys.stderr)
    oom_error = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    model, load_s = load_model(args, torch, transformers)
    parameters = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        # Real prompt embeddings are rows of the embedding table: match their scale.
        table = model.get_input_embeddings().weight
        scale = float(table[: min(4096, table.shape[0])].float().std())

        figures, skipped = [], {}
        for batch in args.batch_sizes:
            try:
                figures += measure_batch(args, torch, model, batch, scale)
            except oom_error as e:
                skipped[batch] = f"out of memory: {str(e).splitlines()[0]}"
            if batch in skipped:  # outside the handler, so its frames no longer hold tensors
                torch.cuda.empty_cache()
            print(f"batch {batch} done", file=sys.stderr, flush=True)

    result = {
        "device": device_name,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },
        "dtype": args.dtype,
        "attn": args.attn,
        "parameters": parameters,
        "load_s": load_s,
        "llm": str(args.llm),
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repetitions": args.repetitions,
            "warmup": args.warmup,
            "embedding_scale": scale,
            "seed": args.seed,
        },
        "figures": figures,
    }
    if skipped:
        result["skipped"] = skipped
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
