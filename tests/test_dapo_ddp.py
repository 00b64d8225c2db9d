"""The DAPO actor's state-wise batches under real 2-process DDP (gloo on the CPU): every batch holds whole
states, both processes take the same number of steps, and together they cover every state each epoch. And
greedy pass@1 under DDP counts each problem once, as one process does.

The tests of ``StateBatchSampler`` in ``test_dapo.py`` simulate the ranks; this one checks that under a real
``DDPStrategy`` Lightning does not put its own per-item sampler in front of the state-wise one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from conftest import ROOT, quiet_run_args

SIZES = [2, 3, 5, 2, 4, 3, 2, 6, 3]  # candidates per state: 9 states, 2 per batch -> 5 batches, one padded


class RecordActorBatches(pl.Callback):
    """Writes every training batch's ``state_index`` and ``ref_logprob`` to ``<output_dir>/rank<R>.json``."""

    def __init__(self, output_dir: str):
        self.output_dir, self.batches = output_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({"epoch": trainer.current_epoch, "state_index": batch["state_index"].tolist(),
                             "ref_logprob": batch["ref_logprob"].tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.output_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


def advantage_file(path: Path) -> dict[float, tuple[int, int]]:
    """An advantage file whose reference log-probs identify each candidate: -(10 * state + candidate + 1)."""
    owner = {}
    with open(path, "w") as handle:
        for s, size in enumerate(SIZES):
            candidates = []
            for c in range(size):
                owner[-(10.0 * s + c + 1)] = (s, c)
                candidates.append({"action": f"{s}+{c}={s + c}\n", "terminal": False, "advantage": 0.1 * c - 0.05,
                                   "ref_logprob": -(10.0 * s + c + 1)})
            handle.write(json.dumps({"state_id": f"p{s}/0", "problem_id": f"p{s}", "kept": True, "gap": 0.5,
                                     "prompt_text": "<|user|>Q<|end|><|assistant|>", "prefix": "",
                                     "candidates": candidates}) + "\n")
    return owner


@pytest.mark.slow
def test_actor_batches_keep_states_whole_under_two_ddp_processes(tmp_path):
    owner = advantage_file(tmp_path / "advantages.jsonl")
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs/dapo/actor.yaml"),
               "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), *quiet_run_args(tmp_path, "actor"),
               "--model.init_args.model=tiny", f"--data.init_args.data_file={tmp_path / 'advantages.jsonl'}",
               "--data.init_args.val_fraction=0.0", "--data.init_args.batch_size=2", "--trainer.max_epochs=2",
               "--trainer.callbacks+=test_dapo_ddp.RecordActorBatches",
               f"--trainer.callbacks.output_dir={tmp_path}"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    batches = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for epoch in (0, 1):
        per_rank = [[b for b in rank_batches if b["epoch"] == epoch] for rank_batches in batches]
        assert len(per_rank[0]) == len(per_rank[1]) == 3  # ceil(5 batches / 2 processes) steps on each
        seen = []
        for rank_batches in per_rank:
            states = set()
            for batch in rank_batches:
                groups: dict[int, set] = {}
                for index, logp in zip(batch["state_index"], batch["ref_logprob"]):
                    groups.setdefault(index, set()).add(owner[logp])
                for members in groups.values():
                    [state] = {s for s, _ in members}  # a batch-local state index is one state
                    assert members == {(state, c) for c in range(SIZES[state])}  # with all its candidates
                    states.add(state)
            seen.append(states)
        assert seen[0] | seen[1] == set(range(len(SIZES)))
        assert len(seen[0] & seen[1]) <= 2  # only the one padding batch repeats states
    orders = [[b["ref_logprob"] for b in batches[0] if b["epoch"] == epoch] for epoch in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled each epoch


@pytest.mark.slow
def test_pass_at_1_under_two_ddp_processes_counts_each_problem_once(tmp_path, run_cli):
    # 5 problems on 2 processes: the distributed sampler gives one process a repeated problem
    small = ["--model.init_args.model=tiny-sft", "--data.init_args.test_size=5", "--data.init_args.eval_batch_size=2",
             "--model.init_args.max_new_tokens=24"]
    results = {}
    run_cli("test", "configs/dapo/evaluate.yaml", *small, name="one")  # the one-process baseline, in this process
    ddp = [sys.executable, str(ROOT / "cli.py"), "test", "--config", str(ROOT / "configs/dapo/evaluate.yaml"), *small,
           "--config", str(ROOT / "configs/trainer/ddp_cpu.yaml"), *quiet_run_args(tmp_path, "ddp")]
    run = subprocess.run(ddp, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("one", "ddp"):
        [folder] = list((tmp_path / name).glob("version_*"))
        rows = [json.loads(line) for line in (folder / "test_generations.jsonl").read_text().splitlines()]
        results[name] = (json.loads((folder / "summary.json").read_text())["stages"]["test"]["metrics"], rows)
    (one_metrics, one_rows), (ddp_metrics, ddp_rows) = results["one"], results["ddp"]
    assert len(ddp_rows) == len({row["problem_id"] for row in ddp_rows}) == 5
    assert [(row["problem_id"], row["correct"]) for row in ddp_rows] == [(row["problem_id"], row["correct"]) for row in one_rows]
    assert ddp_metrics["test/accuracy"] == pytest.approx(one_metrics["test/accuracy"])
    assert ddp_metrics["test/accuracy"] == pytest.approx(sum(row["correct"] for row in ddp_rows) / 5)
