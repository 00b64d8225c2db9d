"""Generation latency of ECO's wrapper against the bare model, in one run.

    python bench/eco_overhead.py                          # the TOFU target + the ECO classifier if they exist
    python bench/eco_overhead.py --model tiny --classifier tiny --batch-size 8 --new-tokens 32

Four timings per repeat, interleaved so load drifts hit them alike (greedy, a fixed number of new tokens):

    bare        model.generate on the prompts
    wrapped     EcoLM.generate with the gate's decisions given (hook present, nothing armed when unflagged)
    classifier  the gate alone on the same prompts (cache cleared: what a fresh prompt costs)
    wrapped+cls EcoLM.generate deciding itself (classifier + generation)

on unflagged prompts (retain-author questions) and on flagged prompts (forget-author questions, forced
flagged). Prints medians and the ratios; the goal is wrapped / bare - 1 < 5% on unflagged prompts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ROOT / "runs/tofu/target/export"
    classifier = ROOT / "runs/eco/classifier/export"
    p.add_argument("--model", default=str(target) if target.exists() else "tiny")
    p.add_argument("--classifier", default=str(classifier) if classifier.exists() else "tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from datamodules.common import pad_sequences, padding_id
    from datamodules.text import with_default_prefix
    from datamodules.tofu import render_prompt
    from datamodules.tofu_data import generate_tofu
    from modules import eco
    from modules.lm import load_model, load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, tokenizer=tokenizer).eval()
    gate = eco.PromptGate.load(eco.lm.resolve_model_path(args.classifier))
    wrapper = eco.EcoLM(model, tokenizer, eco.EcoSettings(strength=1.0, dims=64), gate)
    data = generate_tofu(n_authors=20, qa_per_author=16)
    sets = {"unflagged": [r["question"] for r in data.split("retain_perturbed")][:args.batch_size],
            "flagged": [r["question"] for r in data.split("forget10_perturbed")][:args.batch_size]}
    kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  pad_token_id=padding_id(tokenizer), eos_token_id=tokenizer.eos_token_id)

    def prompts(questions):
        # as the pipeline encodes prompts (datamodules.tofu.encode_qa): the BOS of a tokenizer that adds one, once
        ids = [with_default_prefix(tokenizer, tokenizer(render_prompt(tokenizer, q), add_special_tokens=False)["input_ids"])
               for q in questions]
        return (pad_sequences(ids, padding_id(tokenizer), side="left"),
                pad_sequences([[1] * len(x) for x in ids], 0, side="left"))

    def timed(fn):
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic

    def calls_for(name, questions):
        """The four timed calls on one prompt set (a function, so each closure sees its own set)."""
        input_ids, attention_mask = prompts(questions)
        flags = torch.full((len(questions),), name == "flagged")

        def bare():
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

        def wrapped():
            wrapper.generate(input_ids, attention_mask, questions, flags=flags, **kwargs)

        def classifier():
            gate.probabilities(questions)

        def wrapped_with_classifier():
            wrapper._gate_cache.clear()
            if name == "flagged":  # force the corruption whatever the gate says, to time the flagged path
                wrapper.flags(questions)
                wrapper.generate(input_ids, attention_mask, questions, flags=flags, **kwargs)
            else:
                wrapper.generate(input_ids, attention_mask, questions, **kwargs)

        return {"bare": bare, "wrapped": wrapped, "classifier": classifier, "wrapped+cls": wrapped_with_classifier}

    results = {}
    for name, questions in sets.items():
        calls = calls_for(name, questions)
        for fn in calls.values():  # warm-up
            fn()
        times = {key: [] for key in calls}
        for _ in range(args.repeats):
            for key, fn in calls.items():
                times[key].append(timed(fn))
        results[name] = {key: statistics.median(values) for key, values in times.items()}
        gate_flags = int(wrapper.flags(questions).sum())
        results[name]["gate_flagged"] = gate_flags

    print(f"model {args.model}, classifier {args.classifier}; batch {args.batch_size} prompts, {args.new_tokens} new "
          f"tokens, {args.repeats} repeats (medians), {args.threads} torch thread(s), load {os.getloadavg()}")
    print("| prompts | bare s | wrapped s | wrapped / bare | classifier s | wrapped+classifier / bare | gate flagged |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bare']:.4f} | {r['wrapped']:.4f} | {r['wrapped'] / r['bare']:.3f} | {r['classifier']:.4f} | "
              f"{r['wrapped+cls'] / r['bare']:.3f} | {r['gate_flagged']}/{args.batch_size} |")
    overhead = results["unflagged"]["wrapped"] / results["unflagged"]["bare"] - 1
    print(f"overhead on unflagged prompts beyond the classifier: {100 * overhead:+.2f}% (goal < 5%)")
    return results


if __name__ == "__main__":
    main()
