"""The embedded multi-step arithmetic task: seeded problems, step-per-line solutions, an exact checker,
and preference pairs of graded difficulty for reward models.

A problem ``Compute 7+5-3.`` is solved as::

    7+5=12
    12-3=9
    Answer: 9

One step per line (DAPO splits on "\\n"), then a final answer line. Running values stay in 0..99.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

ANSWER_PREFIX = "Answer: "
_ANSWER_RE = re.compile(r"^Answer:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    question: str
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """Running value after each step."""
        value, out = self.start, []
        for op, operand in self.ops:
            value = value + operand if op == "+" else value - operand
            out.append(value)
        return out

    @property
    def answer(self) -> int:
        return self.values[-1]

    def step_lines(self, values: list[int] | None = None) -> list[str]:
        values = self.values if values is None else values
        lines, left = [], self.start
        for (op, operand), result in zip(self.ops, values):
            lines.append(f"{left}{op}{operand}={result}")
            left = result
        return lines

    def solution(self) -> str:
        return "\n".join(self.step_lines() + [f"{ANSWER_PREFIX}{self.answer}"])

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(prompt=self.question, response=self.solution(), answer=self.answer)
        return row


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3, max_operand: int = 9) -> Problem:
    steps = rng.randint(min_steps, max_steps)
    start = rng.randint(1, max_operand)
    value, ops = start, []
    for _ in range(steps):
        operand = rng.randint(1, max_operand)
        op = rng.choice("+-")
        if op == "-" and value - operand < 0:
            op = "+"
        if op == "+" and value + operand > 99:
            op = "-"
        value = value + operand if op == "+" else value - operand
        ops.append((op, operand))
    expression = str(start) + "".join(f"{op}{operand}" for op, operand in ops)
    return Problem(question=f"Compute {expression}.", start=start, ops=tuple(ops))


def generate_splits(sizes: dict[str, int], seed: int = 0, min_steps: int = 2, max_steps: int = 3,
                    max_operand: int = 9) -> dict[str, list[Problem]]:
    """Disjoint splits (no question appears in two splits), deterministic in ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < size:
            attempts += 1
            if attempts > 50 * size + 1000:
                raise ValueError(f"cannot draw {size} distinct problems for split '{name}' with steps "
                                 f"{min_steps}-{max_steps} and operands up to {max_operand}: too few exist")
            problem = make_problem(rng, min_steps, max_steps, max_operand)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
        splits[name] = problems
    return splits


def extract_answer(completion: str) -> int | None:
    """The integer on the last non-empty line if it is an ``Answer: N`` line, else None."""
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_RE.match(lines[-1])
    return int(match.group(1)) if match else None


def check_answer(problem: Problem | int | dict, completion: str) -> bool:
    """Exact check of a completion's final answer against a problem (or its answer)."""
    if isinstance(problem, Problem):
        expected = problem.answer
    elif isinstance(problem, dict):
        expected = int(problem["answer"])
    else:
        expected = int(problem)
    return extract_answer(completion) == expected


# ----------------------------------------------------------------------------------------------------
# Preference pairs of graded difficulty (in the spirit of RewardBench's categories)

PAIR_SUBSETS = ("format", "consistency", "arithmetic")


def _wrong_value(rng: random.Random, value: int) -> int:
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    return value + delta if value + delta >= 0 else value - delta


def rejected_solution(problem: Problem, subset: str, rng: random.Random) -> str:
    """A flawed solution of one kind:
    - ``format``: the answer line is missing or the solution stops after a step;
    - ``consistency``: every step right, but the answer line contradicts the last step;
    - ``arithmetic``: one step computed wrong, the later steps and answer consistent with the error.
    """
    steps = problem.step_lines()
    if subset == "format":
        cut = rng.randint(1, len(steps))
        return "\n".join(steps[:cut])
    if subset == "consistency":
        return "\n".join(steps + [f"{ANSWER_PREFIX}{_wrong_value(rng, problem.answer)}"])
    if subset == "arithmetic":
        wrong_at = rng.randrange(len(problem.ops))
        values, value = [], problem.start
        for index, (op, operand) in enumerate(problem.ops):
            value = value + operand if op == "+" else value - operand
            if index == wrong_at:
                value = _wrong_value(rng, value)
            values.append(value)
        return "\n".join(problem.step_lines(values) + [f"{ANSWER_PREFIX}{values[-1]}"])
    raise ValueError(f"unknown subset {subset!r}; choose from {PAIR_SUBSETS}")


def preference_rows(problems: list[Problem], subsets: tuple[str, ...] = PAIR_SUBSETS, seed: int = 0,
                    pairs_per_problem: int = 1, weights: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Conversational implicit-prompt pairs (the Skywork-Reward-Preference-80K shape) with a ``subset``,
    drawn uniformly over ``subsets`` or with the given relative ``weights``."""
    rng = random.Random(seed)
    unknown = set(weights or {}) - set(subsets)
    if unknown:
        raise ValueError(f"subset weights name unknown subsets {sorted(unknown)}; subsets are {list(subsets)}")
    subset_weights = [float((weights or {}).get(subset, 1.0 if not weights else 0.0)) for subset in subsets]
    rows = []
    for problem in problems:
        for _ in range(pairs_per_problem):
            subset = rng.choices(subsets, weights=subset_weights)[0]
            user = {"role": "user", "content": problem.question}
            rows.append({
                "chosen": [user, {"role": "assistant", "content": problem.solution()}],
                "rejected": [user, {"role": "assistant", "content": rejected_solution(problem, subset, rng)}],
                "subset": subset,
                "source": "arithmetic",
            })
    return rows
