"""Plumbing shared by the data modules: reading rows from files or the hub with row-exact errors, writing
them atomically, epoch-seeded samplers (so a resumed run sees the same order; optionally grouping items by
length), the training loader built on them, and padding."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data; the message names the source, row and field. ``reason`` is the row-independent
    part, used to count dropped rows by cause."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def row_error(source: str, row: int, field_name: str, problem: str) -> DataError:
    return DataError(f"{source}: row {row}, field '{field_name}': {problem}", reason=f"{field_name}: {problem}")


# Suffixes of files people commonly hand over that this reader does not take: say so instead of trying the hub.
UNSUPPORTED_SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".bz2", ".zip", ".xz", ".zst", ".arrow", ".xlsx")


def looks_like_local_path(source: str) -> bool:
    """A path rather than a hub name ("owner/name" or "name"): absolute, relative with ./ or ../, ~, or with
    more than one folder level. "folder/name" stays a hub name even where that folder exists here."""
    return source.startswith(("/", "./", "../", "~", "\\")) or source.count("/") > 1 or "\\" in source


def unique_keys(source: str, line_number: int | None) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    where = f"line {line_number}" if line_number is not None else "the file"

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        row = dict(pairs)
        if len(row) != len(pairs):  # json keeps the last value of a repeated key without a word
            seen, repeated = set(), []
            for key, _ in pairs:
                if key in seen:
                    repeated.append(key)
                seen.add(key)
            raise DataError(f"{source}: {where} repeats the key(s) {sorted(set(repeated))}; which value is meant "
                            f"is ambiguous", reason=f"repeated key(s) {sorted(set(repeated))}")
        return row
    return build


def read_utf8_text(path: Path, source: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{source}: line {line}, column {column}: byte 0x{data[error.start]:02x} is not valid UTF-8; "
                        f"save the file as UTF-8") from None


def read_rows(source: str, split: str = "train", name: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/Parquet file or of a hub dataset (``name`` is its config).

    A ``.json`` file may hold a list of row objects or one object per line; ``.jsonl`` one object per line.
    Every failure is a ``DataError`` or ``FileNotFoundError`` naming the file (and line): an unsupported
    file type or a missing local path never falls through to the hub."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{source}: is a folder; point at a .json, .jsonl or .parquet file or a hub dataset name")
    if suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {source}")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist()
            except Exception as error:  # pyarrow raises several types for a damaged file
                raise DataError(f"{source}: cannot be read as Parquet ({type(error).__name__}: {error})") from None
        return _json_rows(read_utf8_text(path, source), source, suffix)
    if path.is_file() or suffix in UNSUPPORTED_SUFFIXES:
        state = "" if path.is_file() else " (and it does not exist)"
        raise DataError(f"{source}: unsupported file type '{path.suffix}'{state}; data files must end in "
                        f"{', '.join(sorted(LOCAL_SUFFIXES))} (convert with e.g. pandas: "
                        f"read_csv(...).to_json('rows.jsonl', orient='records', lines=True))")
    if looks_like_local_path(source):
        raise FileNotFoundError(f"data file not found: {source} (a local path; a data file must end in "
                                f"{', '.join(sorted(LOCAL_SUFFIXES))})")
    import datasets

    try:
        return list(datasets.load_dataset(source, name, split=split))
    except Exception as error:  # hub, network and builder errors: say what was attempted
        raise DataError(f"{source}: not a local .json/.jsonl/.parquet file, so it was loaded as a Hugging Face "
                        f"hub dataset (config {name!r}, split {split!r}), which failed: "
                        f"{type(error).__name__}: {error}") from error


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSONL (``.jsonl``), a JSON array (``.json``) or Parquet (``.parquet``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
            raise DataError(f"{path}: Parquet needs one type per column, and these rows mix them (e.g. strings "
                            f"and message lists in one column: several preference shapes in one file); "
                            f"write .jsonl instead ({error})") from None
        pq.write_table(table, tmp)
    elif path.suffix == ".json":
        tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".jsonl":
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{path}: write .jsonl, .json or .parquet")
    os.replace(tmp, path)
    return path


def _json_rows(text: str, source: str, suffix: str) -> list[dict[str, Any]]:
    return _checked_objects([row for _, row in json_rows_with_lines(text, source, suffix)], source)


def json_rows_with_lines(text: str, source: str, suffix: str = ".json") -> list[tuple[int, Any]]:
    """(line number, row) of a JSON file's text: a ``.json`` file may hold one list of rows (line 0 for
    each) or one object per line, ``.jsonl`` one object per line. Invalid JSON and a key repeated within a
    row are ``DataError``s naming ``source`` and the line."""
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith(("[", "{")):
        try:
            rows = json.loads(text, object_pairs_hook=unique_keys(source, None))
        except json.JSONDecodeError as error:
            if stripped.startswith("["):
                raise DataError(f"{source}: invalid JSON at line {error.lineno}: {error.msg}") from None
            rows = None  # not one JSON value: read it as one object per line below
        if isinstance(rows, dict) and len(stripped.rstrip().split("\n")) == 1:
            return [(text[:len(text) - len(stripped)].count("\n") + 1, rows)]  # a one-row file of JSON Lines
        if isinstance(rows, dict):
            lists = [key for key, value in rows.items() if isinstance(value, list)]
            hint = f" (its list field(s): {lists}; save that list itself, or one object per line)" if lists else ""
            raise DataError(f"{source}: the file is one JSON object; expected a list of row objects or one row "
                            f"object per line{hint}")
        if rows is not None:
            return [(0, row) for row in rows]
    rows = []
    # JSON Lines ends a line at "\n" only: str.splitlines() also breaks at U+2028, U+0085 ..., which
    # json.dumps(ensure_ascii=False) leaves unescaped inside strings (e.g. in generated text)
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line, object_pairs_hook=unique_keys(source, line_number))))
        except json.JSONDecodeError as error:
            raise DataError(f"{source}: line {line_number} is not valid JSON: {error.msg}") from None
    return rows


def _checked_objects(rows: list[Any], source: str) -> list[dict[str, Any]]:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {index} is a {type(row).__name__}, expected an object")
    return rows


def padding_id(tokenizer) -> int:
    """The id that fills the padding positions of a batch: the pad token's, else EOS's.

    Llama-2/3 tokenizers come without a pad token. Where padding is masked (attention 0, label -100) any id
    of the vocabulary serves, and EOS is one every causal LM has. Where the id itself matters (a sequence
    classifier pools at the last non-pad token) the module gives its tokenizer a distinct pad token with
    ``ensure_distinct_pad_token`` instead, and this returns it."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has neither "
                     f"a pad nor an EOS token to pad batches with; set tokenizer.pad_token")


@dataclass
class DataReport:
    """What the data pipeline kept, dropped and truncated; logged and written to the run summary."""

    rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)

    def drop(self, split: str, reason: str) -> None:
        reasons = self.dropped.setdefault(split, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "dropped": self.dropped, "truncated": self.truncated}


class EpochSeededSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch): a run resumed at an epoch boundary sees
    exactly the batches an uninterrupted run would.

    ``epoch_source`` (the trainer's ``current_epoch``) wins over ``set_epoch``: after a resume from a
    checkpoint written at an epoch's end, Lightning passes the count of *processed* epochs to
    ``set_epoch``, which is one behind, and the resumed run would replay the previous epoch's order.
    """

    def __init__(self, length: int, seed: int = 0, epoch_source: Callable[[], int] | None = None):
        self.length, self.seed, self.epoch, self.epoch_source = length, seed, 0, epoch_source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_generator(self) -> torch.Generator:
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.length, generator=self.epoch_generator()).tolist())

    def __len__(self) -> int:
        return self.length


class LengthGroupedSampler(EpochSeededSampler):
    """An epoch-seeded order in which each run of ``group_size`` consecutive indices holds items of similar
    length, so a batch pads little: the epoch's random permutation is cut into windows of
    ``window_groups`` groups, each window is sorted by length and cut into groups, and the groups of the
    whole epoch are shuffled, with the group holding the longest item first (an out-of-memory error then
    shows at the first step, not hours in).

    Shuffling the groups, not only the windows, keeps batch length from trending within an epoch. The
    order depends only on (seed, epoch, group_size), as ``EpochSeededSampler``'s on (seed, epoch), so
    resuming mid-epoch works the same (with the same number of processes: ``training_loader`` makes a
    group one batch per process, and ``ProcessShard`` gives process r the indices r, r + W, ... of it)."""

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int = 0,
                 epoch_source: Callable[[], int] | None = None, window_groups: int = 50):
        if group_size < 1 or window_groups < 1:
            raise ValueError(f"group_size and window_groups must be at least 1, got {group_size}, {window_groups}")
        super().__init__(len(lengths), seed, epoch_source)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.group_size, self.window_groups = group_size, window_groups

    def __iter__(self) -> Iterator[int]:
        generator = self.epoch_generator()
        order = torch.randperm(self.length, generator=generator)
        window = self.group_size * self.window_groups
        starts = list(range(0, self.length, window))
        if len(starts) > 1 and self.length - starts[-1] < self.group_size:
            starts.pop()  # a last window smaller than a group joins the one before, so only short items are left over
        groups: list[torch.Tensor] = []
        for start, end in zip(starts, starts[1:] + [self.length]):
            indices = order[start:end]
            # stable sort, longest first: equal lengths keep their random order
            indices = indices[torch.sort(self.lengths[indices], descending=True, stable=True).indices]
            groups += list(indices.split(self.group_size))
        # a partial group only at the very end, where the loader's last (short) batch falls
        full = [group for group in groups if len(group) == self.group_size]
        partial = [group for group in groups if len(group) < self.group_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda i: int(self.lengths[shuffled[i]].max()))
            shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return iter(torch.cat(shuffled + partial).tolist() if groups else [])


class ProcessShard(DistributedSampler):
    """Process ``rank``'s share of an epoch order: its indices rank, rank + W, rank + 2W, ..., the order
    padded to a multiple of W by repeating its last items (in a length-grouped order, the last group's).

    It is a ``DistributedSampler`` only so that Lightning keeps it: given any other training sampler,
    Lightning wraps it in a ``DistributedSamplerWrapper`` that shuffles the order again, which would break
    length groups apart. The epoch comes from the wrapped sampler (its ``epoch_source``, else ``set_epoch``)."""

    def __init__(self, sampler: EpochSeededSampler, num_replicas: int, rank: int):
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        missing = self.total_size - len(order)
        if order and missing:
            order += (order[::-1] * (missing // len(order) + 1))[:missing]
        return iter(order[self.rank:self.total_size:self.num_replicas])


def batch_coverage(order: Sequence[int], kinds: Sequence[Any], batch_size: int) -> dict[Any, float]:
    """Share of the order's full batches that hold at least one item of each kind."""
    batches = [order[start:start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]
    held: dict[Any, int] = {kind: 0 for kind in kinds}
    for batch in batches:
        for kind in {kinds[index] for index in batch}:
            held[kind] += 1
    return {kind: count / max(len(batches), 1) for kind, count in held.items()}


def kinds_grouping_separates(lengths: Sequence[int], kinds: Sequence[Any], batch_size: int, seed: int = 0,
                             ratio: float = 0.5) -> dict[Any, tuple[float, float]]:
    """The kinds of item (say a preference subset) that length-grouped batches hold far more rarely than
    uniform ones: kind -> (share of grouped batches holding it, share of uniform batches), for the kinds
    below ``ratio`` times their uniform share in epoch 0's orders. Where length follows the kind, each
    grouped batch holds one kind, and a rare kind meets the others in few optimizer steps."""
    grouped = batch_coverage(list(LengthGroupedSampler(lengths, batch_size, seed)), kinds, batch_size)
    uniform = batch_coverage(list(EpochSeededSampler(len(lengths), seed)), kinds, batch_size)
    return {kind: (grouped[kind], uniform[kind]) for kind in sorted(grouped, key=str)
            if grouped[kind] < ratio * uniform[kind]}


def training_loader(data: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], seed: int,
                    trainer: Any, num_workers: int = 0, lengths: Sequence[int] | None = None,
                    order: type[EpochSeededSampler] = EpochSeededSampler) -> DataLoader:
    """The training loader every data module uses: a seeded order per epoch (an ``order`` sampler),
    resumable mid-epoch; with ``lengths``, grouped by length (``LengthGroupedSampler``, groups of one batch
    per process). With several processes, each gets its ``ProcessShard`` of the one order."""
    epoch_source = (lambda: trainer.current_epoch) if trainer is not None else None
    processes = trainer.world_size if trainer is not None else 1
    if lengths is None:
        sampler: Sampler[int] = order(len(data), seed, epoch_source=epoch_source)
    else:
        sampler = LengthGroupedSampler(lengths, batch_size * processes, seed, epoch_source=epoch_source)
    if processes > 1:
        sampler = ProcessShard(sampler, processes, trainer.global_rank)
    return ResumableDataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                               num_workers=num_workers, persistent_workers=num_workers > 0, trainer=trainer)


def batches_done_in_epoch(trainer: Any) -> int:
    """Training batches of the current epoch that Lightning counts as already consumed: nonzero only when
    a fit resumed from a checkpoint written mid-epoch (its restored batch progress)."""
    if trainer is None:
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    batches = trainer.num_training_batches
    return done if isinstance(batches, int) and 0 < done < batches else 0


class _SkipAtFirstBatch:
    """The iterator of a ``ResumableDataLoader``. The loader's own iterator is made at the first batch
    asked for, and ``skip()`` batches are dropped then: Lightning makes the first epoch's iterator before
    it restores the checkpoint's progress and epoch, and worker processes would start prefetching at once
    (with the sampler reading epoch 0)."""

    def __init__(self, loader: DataLoader, make_iterator: Callable[[], Iterator], skip: Callable[[], int]):
        self.loader, self.make_iterator, self.skip = loader, make_iterator, skip
        self.iterator: Iterator | None = None

    def __iter__(self) -> _SkipAtFirstBatch:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.make_iterator()
            for _ in range(self.skip()):
                next(self.iterator)
        return next(self.iterator)

    def __len__(self) -> int:
        return len(self.loader)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that starts a resumed epoch where its checkpoint left it.

    Lightning resumes a fit from a checkpoint written mid-epoch (the main job validates and checkpoints
    every 200 of 250 steps) by iterating the epoch's data from its first batch again, so the resumed run
    would see other batches than an uninterrupted one. With ``EpochSeededSampler`` the epoch's order is
    known; this loader skips the batches the checkpoint had consumed (``batches_done_in_epoch``, read
    when the epoch's first batch is asked for), so the resumed epoch goes on with the batches an
    uninterrupted run would train next. The result is the uninterrupted run's exactly when the checkpoint
    fell on an optimizer step (always without gradient accumulation); a checkpoint inside an accumulation
    window does not hold the gradients summed so far, so those batches' share of the next step is lost.
    The skipped batches are loaded and dropped (collation only: the data are tokenized already). Skipping
    per batch, after Lightning's distributed sampler has split the indices, gives each process its own
    next batch.

    ``state_dict``/``load_state_dict`` make Lightning treat the loader as resumable; there is nothing to
    store, since the position follows from Lightning's restored batch progress."""

    def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def __iter__(self):
        return _SkipAtFirstBatch(self, super().__iter__, lambda: batches_done_in_epoch(self.trainer))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    width = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if side == "right":
            out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        else:
            out[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
    return out


def truncate(ids: list[int], max_length: int, side: str, keep_first: int = 0) -> tuple[list[int], bool]:
    """``ids`` cut to ``max_length`` on ``side``, and whether they were cut. A cut on the left keeps the
    first ``keep_first`` ids in front (a BOS: the model saw it at position 0 in training, and it holds no
    content), unless they leave no room for anything else."""
    if len(ids) <= max_length:
        return ids, False
    if side == "right":
        return ids[:max_length], True
    head = ids[:keep_first] if keep_first < max_length else []
    return head + ids[len(ids) - (max_length - len(head)):], True


def check_side(value: str, name: str) -> str:
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def shards_parameters(strategy: Any) -> bool:
    """FSDP and DeepSpeed ZeRO-3 shard the parameters: every forward gathers them from all processes, so
    every process must run the same number of forwards (ZeRO-1/2 keep whole parameters on each)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3))
