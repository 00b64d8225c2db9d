"""Generated tokens per second: the DAPO stage-1 engine against naive one-sequence-at-a-time ``generate``.

Same model, same prompts (arithmetic problems rendered with the chat template), same sampling
(temperature, no top-k/top-p). The workload is stage 1's shape: every prompt sampled ``--samples`` times.

- ``engine``: ``modules.dapo.RolloutEngine`` over the whole workload (left padding, KV cache, one prefill
  per prompt expanded to its samples, finished rows dropped from the batch);
- ``naive``: ``model.generate`` on one sequence at a time (batch 1, KV cache on: the stock loop), over the
  first ``--naive-sequences`` (prompt, sample) pairs (a rate, so a subset measures it fairly);
- ``hf_batched`` (reference): ``model.generate`` on all prompts at once with left padding and
  ``num_return_sequences`` (the prompt is prefilled once per sample).

Rounds alternate the methods so a change in machine load hits all of them; tokens are counted up to and
including the stop token. Besides wall-clock rates it reports rates per CPU-second of this process (less
sensitive to other processes on a shared machine). Prints a table and writes ``--out`` (JSON) with the
machine load.

    python bench/rollout_throughput.py --model runs/sft/arithmetic/export
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from datamodules.common import pad_sequences, padding_id  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="policy folder or preset (default: the untrained tiny preset)")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (stage 1's n1 or m)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-batch-sequences", type=int, default=256)
    parser.add_argument("--naive-sequences", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "runs/bench/rollout_throughput.json"))
    return parser.parse_args(argv)


def load_prompts(tokenizer, count: int) -> list[list[int]]:
    from datamodules import arithmetic
    from datamodules.dapo_data import encode_prompt, prompt_text_for

    problems = arithmetic.generate_splits({"bench": count}, seed=1234)["bench"]
    return [encode_prompt(tokenizer, prompt_text_for(tokenizer, p.question, True)) for p in problems]


def run_engine(engine, prompts, args, seed) -> tuple[int, float]:
    generator = torch.Generator(device=args.device).manual_seed(seed)
    start = time.perf_counter()
    outputs = engine.generate(prompts, args.samples, args.max_new_tokens, temperature=args.temperature,
                              generator=generator)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.token_ids) + int(g.finished) for gens in outputs for g in gens)
    return tokens, seconds


def run_naive(model, tokenizer, prompts, args, seed) -> tuple[int, float]:
    pairs = [(p, k) for p in prompts for k in range(args.samples)][:args.naive_sequences]
    torch.manual_seed(seed)
    tokens, start = 0, time.perf_counter()
    for prompt, _ in pairs:
        ids = torch.tensor([prompt], device=args.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                             pad_token_id=padding_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start


def run_hf_batched(model, tokenizer, prompts, args, seed) -> tuple[int, float]:
    torch.manual_seed(seed)
    ids = pad_sequences(prompts, padding_id(tokenizer), side="left").to(args.device)
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(args.device)
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(prompts), max(1, args.max_batch_sequences // args.samples)):
        last = first + max(1, args.max_batch_sequences // args.samples)
        out = model.generate(input_ids=ids[first:last], attention_mask=mask[first:last], do_sample=True,
                             temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                             num_return_sequences=args.samples, pad_token_id=padding_id(tokenizer),
                             eos_token_id=tokenizer.eos_token_id)
        generated = out[:, ids.shape[1]:]
        for row in generated.tolist():  # up to and including the first EOS
            tokens += next((i + 1 for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
    return tokens, time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from modules import lm
    from modules.dapo import RolloutEngine

    tokenizer = lm.load_tokenizer(args.model)
    model = lm.load_model(args.model, attn_implementation="sdpa").to(args.device).eval()
    engine = RolloutEngine(model, tokenizer, args.max_batch_sequences)
    prompts = load_prompts(tokenizer, args.problems)
    load_before = os.getloadavg()

    # warm-up (allocator, kernels, lazy imports)
    run_engine(engine, prompts[:2], argparse.Namespace(**{**vars(args), "samples": 2}), 0)
    run_naive(model, tokenizer, prompts[:1], argparse.Namespace(**{**vars(args), "naive_sequences": 1}), 0)

    totals = {name: [0, 0.0, 0.0] for name in ("engine", "naive", "hf_batched")}
    with torch.no_grad():
        for round_index in range(args.rounds):
            for name, run in (("engine", lambda s: run_engine(engine, prompts, args, s)),
                              ("naive", lambda s: run_naive(model, tokenizer, prompts, args, s)),
                              ("hf_batched", lambda s: run_hf_batched(model, tokenizer, prompts, args, s))):
                cpu_start = time.process_time()
                tokens, seconds = run(1000 + round_index)
                cpu = time.process_time() - cpu_start
                totals[name][0] += tokens
                totals[name][1] += seconds
                totals[name][2] += cpu
                print(f"round {round_index}: {name:10s} {tokens:7d} tokens in {seconds:7.2f} s ({cpu:7.2f} CPU s)",
                      flush=True)
    rates = {name: tokens / seconds for name, (tokens, seconds, _) in totals.items()}
    cpu_rates = {name: tokens / cpu for name, (tokens, _, cpu) in totals.items()}
    result = {
        "model": args.model, "device": args.device, "torch_threads": torch.get_num_threads(),
        "problems": args.problems, "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "naive_sequences": args.naive_sequences, "rounds": args.rounds,
        "tokens": {k: v[0] for k, v in totals.items()}, "seconds": {k: v[1] for k, v in totals.items()},
        "cpu_seconds": {k: v[2] for k, v in totals.items()},
        "tokens_per_second": rates, "tokens_per_cpu_second": cpu_rates,
        "ratio_engine_vs_naive": rates["engine"] / rates["naive"],
        "ratio_engine_vs_naive_cpu_time": cpu_rates["engine"] / cpu_rates["naive"],
        "ratio_hf_batched_vs_naive": rates["hf_batched"] / rates["naive"],
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
    }
    print("\n| method | tokens | wall s | tokens/s | CPU s | tokens/CPU-s |\n|---|---|---|---|---|---|")
    for name, (tokens, seconds, cpu) in totals.items():
        print(f"| {name} | {tokens} | {seconds:.2f} | {rates[name]:.1f} | {cpu:.2f} | {cpu_rates[name]:.1f} |")
    print(f"\nengine / naive: {result['ratio_engine_vs_naive']:.1f}x wall-clock, "
          f"{result['ratio_engine_vs_naive_cpu_time']:.1f}x per CPU-second   (HF batched / naive: "
          f"{result['ratio_hf_batched_vs_naive']:.1f}x)   load average before/after: "
          f"{load_before[0]:.2f} / {result['load_average_after'][0]:.2f} on {os.cpu_count()} CPUs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
