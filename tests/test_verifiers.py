"""Answer checking: math equivalence and dataset adapters, the code sandbox against hostile programs,
HumanEval canonical/corrupted solutions, and the reward dispatcher."""

from __future__ import annotations

import functools
import os
import socket
import time
from pathlib import Path

import pytest

from datamodules import verifiers as v

FIXTURES = Path(__file__).parent / "fixtures"
# the runner's source is in the command line of every sandboxed process, forks included
RUNNER_MARK = b"_sandbox_runner"


# ====================================================================================================
# Math


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("x^2 + 1", "x^2+1"),
        ("\\boxed{x^2+1}", "x^2 + 1"),
        ("\\frac{\\sqrt3}{2}", "\\dfrac{\\sqrt{3}}{2}"),
        ("\\sqrt{18}", "3\\sqrt{2}"),
        ("(1, 2)", "(1,2)"),
        ("1,400", "1400"),
        ("72.0", "72"),
        ("14 dollars", "14"),
    ],
)
def test_equivalent_answers_are_accepted(predicted, gold):
    if predicted.startswith("\\boxed"):
        predicted = v.extract_boxed(predicted)
    assert v.math_answers_equal(predicted, gold)


@pytest.mark.parametrize(
    "predicted, gold",
    [
        ("0.6", "\\frac{1}{2}"),
        ("x^2 + 2", "x^2+1"),
        ("x^2 - 1", "x^2+1"),
        ("[1, 2]", "(1,2)"),
        ("2\\sqrt{3}", "3\\sqrt{2}"),
        ("1300", "1400"),
        ("", "5"),
        ("5", ""),
    ],
)
def test_wrong_answers_are_rejected(predicted, gold):
    assert not v.math_answers_equal(predicted, gold)


def test_extract_boxed_handles_nesting_and_takes_the_last():
    assert v.extract_boxed("so \\boxed{\\frac{\\sqrt{3}}{2}} done") == "\\frac{\\sqrt{3}}{2}"
    assert v.extract_boxed("\\boxed{1} then \\boxed{\\text{(C)}}") == "\\text{(C)}"
    assert v.extract_boxed("escaped \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert v.extract_boxed("\\fbox{7}") == "7"
    assert v.extract_boxed("\\boxed 5.") == "5"
    assert v.extract_boxed("\\boxed{unbalanced") is None
    assert v.extract_boxed("no box at all") is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Step 1.\nStep 2.\nAnswer: 42", "42"),
        ("We add them.\nThe answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("So the final answer is 7.", "7"),
        ("**Answer:** 216", "216"),
        ("48 / 2 = 24\n#### 1,200", "1,200"),
        ("Therefore $x = \\boxed{x^2+1}$.", "x^2+1"),
        ("The answer is $\\boxed{13}$.", "13"),
        ("Answer: $14", "14"),
        # the marker that starts last wins: a boxed intermediate result is not the final answer
        ("First \\boxed{12}.\nWait, I made an error.\nAnswer: 13", "13"),
        ("Answer: 13\nOn reflection: \\boxed{12}", "12"),
        ("I am not sure, maybe 13.", None),
        ("", None),
    ],
)
def test_extract_final_answer(completion, expected):
    assert v.extract_final_answer(completion) == expected


def test_check_math_answer_on_whole_completions():
    assert v.check_math_answer("1/4 + 1/4 = 1/2\nThe answer is 0.5.", "\\frac{1}{2}")
    assert v.check_math_answer("Expanding gives \\boxed{1 + x^2}", "x^2+1")
    assert not v.check_math_answer("Expanding gives \\boxed{x^2 + 2x + 1}", "x^2+1")
    assert not v.check_math_answer("no final answer line", "1")


def test_math_checks_work_off_the_main_thread():
    # math-verify's own timeouts use signal.alarm (main thread only); worker threads must still work
    from concurrent.futures import ThreadPoolExecutor

    pairs = [("0.5", "\\frac{1}{2}"), ("0.6", "\\frac{1}{2}"), ("x^2 + 1", "1 + x^2")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda pair: v.math_answers_equal(*pair), pairs)) == [True, False, True]


def test_math_adapter_reads_the_fixture():
    problems = v.load_math_problems(FIXTURES / "math_sample.jsonl", "math")
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "x^2+1", "\\dfrac{\\sqrt{3}}{2}", "(1,2)", "3\\sqrt{2}", "13"]
    assert all(p.source == "math" for p in problems)
    assert problems[0].row_id == "math_sample.jsonl:1"
    assert problems[3].question.startswith("For which values of $x$")
    # each reference solution, read as a model completion, is judged correct against its own answer
    assert all(v.check_math_answer(p.solution, p.answer) for p in problems)


def test_gsm8k_adapter_reads_the_fixture():
    problems = v.load_math_problems(FIXTURES / "gsm8k_sample.jsonl", "gsm8k")
    assert [p.answer for p in problems] == ["14", "1400", "8", "216", "13800"]  # commas removed
    assert all(p.source == "gsm8k" for p in problems)
    assert all(v.check_math_answer(p.solution, p.answer) for p in problems)
    assert v.check_math_answer("1500 - 300 + 200 = 1400\nThe answer is 1,400 boxes.", problems[1].answer)
    assert not v.check_math_answer("#### 1300", problems[1].answer)


def test_missing_fields_name_the_row_and_field():
    with pytest.raises(v.RowFormatError, match=r"MATH row math_missing_field\.jsonl:2: missing field 'solution'"):
        v.load_math_problems(FIXTURES / "math_missing_field.jsonl", "math")
    with pytest.raises(v.RowFormatError, match=r"GSM8K row gsm8k_missing_field\.jsonl:3: missing field 'answer'"):
        v.load_math_problems(FIXTURES / "gsm8k_missing_field.jsonl", "gsm8k")
    with pytest.raises(v.RowFormatError, match=r"MATH row 7: missing field 'problem'"):
        v.math_problem_from_row({"solution": "\\boxed{1}"}, "7")
    # the GSM8K file read as MATH rows: wrong shape, named precisely
    with pytest.raises(v.RowFormatError, match=r"gsm8k_sample\.jsonl:1: missing field 'problem'"):
        v.load_math_problems(FIXTURES / "gsm8k_sample.jsonl", "math")


def test_rows_without_a_gold_answer_are_errors():
    with pytest.raises(v.RowFormatError, match=r"MATH row r1: field 'solution' contains no \\boxed"):
        v.math_problem_from_row({"problem": "p", "solution": "the answer is 3"}, "r1")
    with pytest.raises(v.RowFormatError, match=r"GSM8K row r2: field 'answer' does not end in a '#### N' line"):
        v.gsm8k_problem_from_row({"question": "q", "answer": "it is 3"}, "r2")
    with pytest.raises(v.RowFormatError, match=r"field 'solution' must be a string"):
        v.math_problem_from_row({"problem": "p", "solution": None}, "r3")
    with pytest.raises(ValueError, match="unknown math dataset"):
        v.load_math_problems(FIXTURES / "math_sample.jsonl", "aime")


# ====================================================================================================
# Reward dispatcher


def test_reward_dispatches_by_task_kind():
    seen = []

    def checker(problem, completion):
        seen.append((problem, completion))
        return completion.strip().endswith(str(problem))

    assert v.reward("arithmetic", "3+4=7\nAnswer: 7", 7, arithmetic_checker=checker) == 1.0
    assert v.reward("arithmetic", "Answer: 8", 7, arithmetic_checker=checker) == 0.0
    assert seen == [(7, "3+4=7\nAnswer: 7"), (7, "Answer: 8")]
    # the default arithmetic checker is the task's own exact check
    assert v.reward("arithmetic", "7+5=12\nAnswer: 12", 12) == 1.0
    assert v.reward("arithmetic", "7+5=12\nAnswer: 11", 12) == 0.0

    problem = v.load_math_problems(FIXTURES / "math_sample.jsonl", "math")[0]
    assert v.reward("math", "The answer is 0.5", problem) == 1.0
    assert v.reward("math", "The answer is 0.5", "\\frac{1}{2}") == 1.0
    assert v.reward("math", "The answer is 0.25", problem) == 0.0

    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    assert v.reward("code", "def add(a, b):\n    return a + b\n", tests) == 1.0
    assert v.reward("code", "def add(a, b):\n    return a - b\n", tests) == 0.0
    humaneval_shaped = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n",
                        "entry_point": "add"}
    assert v.reward("code", "    return a + b\n", humaneval_shaped) == 1.0
    assert v.reward("code", "    return a * b\n", humaneval_shaped) == 0.0
    assert v.rewards("code", ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"],
                     [tests, tests]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown task kind"):
        v.reward("chess", "e4", "e4")


# ====================================================================================================
# Sandbox: ordinary behaviour


FAST = v.SandboxLimits(wall_seconds=5, cpu_seconds=5, memory_bytes=256 << 20)


@functools.lru_cache(maxsize=1)
def isolation() -> frozenset[str]:
    result = v.run_python_sandboxed("pass", FAST)
    assert result.passed, result
    return frozenset(result.isolation)


def require(*any_of: str) -> None:
    """Skip unless the sandbox got at least one of these mechanisms on this machine (root: all)."""
    if not isolation() & set(any_of):
        pytest.skip(f"needs one of {any_of}; this machine's sandbox has {sorted(isolation())}")


def sandbox_processes() -> set[tuple[int, int]]:
    """(pid, uid) of every live process that runs sandboxed code, namespaced or not."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if RUNNER_MARK in cmdline or uid in v.SANDBOX_UID_RANGE:
            found.add((int(entry), uid))
    return found


@pytest.fixture
def no_leftovers():
    """Asserts after the test that no sandboxed process outlived its run."""
    before = sandbox_processes()
    yield
    leftovers = sandbox_processes() - before
    assert not leftovers, f"sandboxed processes survived: {leftovers}"


def test_passing_program_reports_output_and_isolation(no_leftovers):
    result = v.run_python_sandboxed("import sys\nprint('hello')\nprint('warn', file=sys.stderr)\n", FAST)
    assert result.passed and result.status == "passed"
    assert result.exit_code == 0 and result.signal is None
    assert result.stdout == "hello\n" and result.stderr == "warn\n" and not result.truncated
    assert result.duration < FAST.wall_seconds
    assert "rlimits" in result.isolation
    if os.geteuid() == 0:  # what root gets on Linux here: every mechanism of the module docstring
        assert {"pid_namespace", "net_namespace", "mount_namespace", "readonly_root", "private_tmp",
                "unprivileged_uid", "no_new_privs", "rlimit_nproc"} <= set(result.isolation)


def test_program_runs_as_a_plain_main_module(no_leftovers):
    # none of the runner's names or compiler flags (e.g. postponed annotations) leak into the program
    program = (
        "import __main__, sys\n"
        "def f(x: int) -> int:\n    return x\n"
        "assert f.__annotations__ == {'x': int, 'return': int}, f.__annotations__\n"
        "assert __name__ == '__main__' and __main__.f is f and sys.argv == ['main.py']\n"
        "assert sorted(k for k in vars(__main__) if not k.startswith('__')) == ['f', 'sys']\n"
        "assert input.__module__ == 'builtins' and sys.stdin.read() == ''\n"
    )
    result = v.run_python_sandboxed(program, FAST)
    assert result.passed, result.stderr


def test_failures_are_reported(no_leftovers):
    failed = v.run_python_sandboxed("assert 1 + 1 == 3, 'arithmetic is broken'\n", FAST)
    assert failed.status == "failed" and not failed.passed and failed.exit_code == 1
    assert "AssertionError: arithmetic is broken" in failed.stderr
    syntax = v.run_python_sandboxed("def broken(:\n", FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr
    raised = v.run_python_sandboxed("raise KeyError('k')\n", FAST)
    assert raised.status == "failed" and "KeyError" in raised.stderr


@pytest.mark.parametrize("early_exit", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit(0)"])
def test_exiting_before_the_tests_is_not_a_pass(early_exit, no_leftovers):
    result = v.run_python_sandboxed(f"{early_exit}\nassert False, 'the tests'\n", FAST)
    assert result.exit_code == 0
    assert result.status == "failed" and "before running to the end" in result.detail


def test_output_is_truncated_and_capped(no_leftovers):
    limits = v.SandboxLimits(wall_seconds=5, max_output_chars=1000, max_file_bytes=1 << 20)
    printed = v.run_python_sandboxed("print('a' * 5000)\nprint('THE END')\n", limits)
    assert printed.passed and printed.truncated
    assert printed.stdout.startswith("a" * 100) and printed.stdout.rstrip().endswith("THE END")
    assert len(printed.stdout) < 1200
    # endless output stops at the file-size limit instead of filling the host's disk
    flood = v.run_python_sandboxed("while True:\n    print('x' * 10000)\n", limits)
    assert flood.status == "failed" and flood.truncated  # not "timeout": the file-size limit stopped it


def test_working_directory_is_private_and_removed(no_leftovers):
    program = (
        "import os\n"
        "with open('scratch.txt', 'w') as f:\n    f.write('kept')\n"
        "assert open('scratch.txt').read() == 'kept'\n"
        "assert sorted(os.listdir('.')) == ['main.py', 'scratch.txt'], os.listdir('.')\n"
        "print(os.getcwd())\n"
    )
    result = v.run_python_sandboxed(program, FAST)
    assert result.passed, result.stderr
    workdir = result.stdout.strip()
    assert Path(workdir).name.startswith("sandbox-")
    assert not os.path.exists(workdir)  # deleted afterwards (on the host; in the namespace it died with it)


# ====================================================================================================
# Sandbox: hostile programs. Each must end as a non-pass, leave no process behind and not harm us.


def test_infinite_loop_times_out(no_leftovers):
    limits = v.SandboxLimits(wall_seconds=1.5, cpu_seconds=30)
    started = time.monotonic()
    result = v.run_python_sandboxed("while True:\n    pass\n", limits)
    assert result.status == "timeout" and "wall-clock" in result.detail
    assert 1.5 <= result.duration < 4 and time.monotonic() - started < 10


def test_cpu_limit_kills_a_busy_program(no_leftovers):
    result = v.run_python_sandboxed("while True:\n    pass\n", v.SandboxLimits(wall_seconds=20, cpu_seconds=1))
    assert result.status == "timeout" and "CPU" in result.detail  # the CPU limit fired, not the wall one


def test_sleeping_program_times_out_on_wall_clock(no_leftovers):
    result = v.run_python_sandboxed("import time\ntime.sleep(60)\n", v.SandboxLimits(wall_seconds=1))
    assert result.status == "timeout" and "wall-clock" in result.detail and result.duration < 4


def test_memory_bomb_is_contained(no_leftovers):
    limits = v.SandboxLimits(wall_seconds=10, memory_bytes=256 << 20)
    hoard = v.run_python_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n", limits)
    assert hoard.status == "memory" and "MemoryError" in hoard.stderr
    huge = v.run_python_sandboxed("x = bytearray(8 << 30)\n", limits)
    assert huge.status == "memory"


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        # children that leave the process group (setsid) must be killed too
        "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass\n",
    ],
    ids=["plain", "setsid"],
)
def test_fork_bomb_is_contained(bomb, no_leftovers):
    require("pid_namespace", "rlimit_nproc")  # never run a fork bomb without a process cap or namespace
    limits = v.SandboxLimits(wall_seconds=2, cpu_seconds=10, max_processes=16)
    started = time.monotonic()
    result = v.run_python_sandboxed(bomb, limits)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - started < 12
    # no_leftovers checks that none of its processes survived


def test_fork_bomb_does_not_starve_concurrent_runs(no_leftovers):
    # each run has its own uid, hence its own RLIMIT_NPROC count: innocent neighbours still start
    require("unprivileged_uid")
    from concurrent.futures import ThreadPoolExecutor

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    with ThreadPoolExecutor(max_workers=4) as pool:
        bombing = pool.submit(v.run_python_sandboxed, bomb, v.SandboxLimits(wall_seconds=3, max_processes=16))
        time.sleep(1.0)  # let it reach its process cap
        neighbours = [pool.submit(v.run_python_sandboxed, f"assert sum(range({n})) == {n * (n - 1) // 2}\n", FAST)
                      for n in range(3)]
        statuses = [future.result().status for future in neighbours]
        assert bombing.result().status == "timeout"
    assert statuses == ["passed"] * 3


def test_background_processes_die_with_the_program(no_leftovers):
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    result = v.run_python_sandboxed(program, FAST)
    assert result.passed and result.stdout == "parent done\n"
    # the daemonized grandchild sleeping for a minute is gone: no_leftovers


def test_writing_outside_the_working_directory_fails(tmp_path, no_leftovers):
    require("unprivileged_uid", "readonly_root")
    targets = [tmp_path / "pwned.txt", Path("/var/tmp") / f"pwned-{os.getpid()}.txt",
               Path(__file__).parent / f"pwned-{os.getpid()}.txt"]
    for target in targets:
        result = v.run_python_sandboxed(f"open({str(target)!r}, 'w').write('owned')\n", FAST)
        assert result.status == "failed" and "Error" in result.stderr, result
        assert not target.exists()
    if "private_tmp" in isolation():
        # /tmp inside the sandbox is its own tmpfs: writable there, but it never reaches the host's /tmp
        marker = f"/tmp/sandbox-leak-{os.getpid()}.txt"
        leak = v.run_python_sandboxed(f"open({marker!r}, 'w').write('x')\nprint(open({marker!r}).read())\n", FAST)
        assert leak.passed and leak.stdout == "x\n"
        assert not os.path.exists(marker)


def test_killing_its_parent_does_not_harm_the_host(no_leftovers):
    require("pid_namespace", "unprivileged_uid")
    program = (
        "import os, signal\n"
        "attempts = []\n"
        f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        attempts.append((pid, 'sent'))\n"
        "    except OSError as error:\n"
        "        attempts.append((pid, type(error).__name__))\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"  # every process it may signal: only itself
        "except OSError:\n"
        "    pass\n"
        "print(attempts)\n"
        "assert all(outcome == 'sent' for _, outcome in attempts), attempts\n"
    )
    result = v.run_python_sandboxed(program, FAST)
    assert not result.passed and result.status in {"failed", "error"}
    assert os.getppid() > 0  # we are still here, and so is our parent
    assert v.run_python_sandboxed("print('still works')\n", FAST).passed


def test_environment_secrets_are_not_visible(monkeypatch, no_leftovers):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("VERIFIERS_TEST_API_KEY", secret)
    program = (
        "import glob, os\n"
        "texts = [repr(dict(os.environ))]\n"
        "for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
        "    try:\n"
        "        texts.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n"
        "        pass\n"
        "print(sorted(os.environ))\n"
        "assert any('VERIFIERS_TEST_API_KEY' in text or 's3cr3t-' in text for text in texts), 'nothing found'\n"
    )
    result = v.run_python_sandboxed(program, FAST)
    assert result.status == "failed" and "nothing found" in result.stderr
    assert secret not in result.stdout + result.stderr
    assert "VERIFIERS_TEST_API_KEY" not in result.stdout


def test_network_is_unreachable(no_leftovers):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        result = v.run_python_sandboxed(program, FAST)
        assert result.status == "failed" and ("OSError" in result.stderr or "PermissionError" in result.stderr)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_fallback_without_namespaces(no_leftovers):
    """The degraded mode (no namespaces, as when not root) still times out, blocks sockets by audit hook
    and kills the program's descendants."""
    fallback = functools.partial(v.run_python_sandboxed, namespaces=False, allow_root=True)
    ok = fallback("print('ok')\n", FAST)
    assert ok.passed and "pid_namespace" not in ok.isolation and "audit_hook_no_network" in ok.isolation
    assert fallback("while True:\n    pass\n", v.SandboxLimits(wall_seconds=1)).status == "timeout"
    net = fallback("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", FAST)
    assert net.status == "failed" and "disabled" in net.stderr
    daemon = fallback(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
        "else:\n    print('parent done')\n", FAST)
    assert daemon.passed


def test_root_without_a_uid_switch_is_refused():
    if os.geteuid() != 0:
        pytest.skip("only root callers are refused")
    # with no mount namespace the Python here (under /root) is unreadable by other uids: no uid switch
    result = v.run_python_sandboxed("print('ran as root')\n", FAST, namespaces=False)
    if "unprivileged_uid" in result.isolation:
        pytest.skip("this interpreter is readable by any uid, so the uid switch works without namespaces")
    assert result.status == "error" and "refusing to run the program as root" in result.detail
    assert "ran as root" not in result.stdout


# ====================================================================================================
# HumanEval

PERTURBATION = '''

def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "?"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    if isinstance(value, dict):
        return {{**value, "?": None}}
    return 0 if value is None else None


_canonical_{name} = {name}


def {name}(*args, **kwargs):
    return _perturbed(_canonical_{name}(*args, **kwargs))
'''


@pytest.fixture(scope="module")
def humaneval():
    return v.load_humaneval()


def test_humaneval_loader(humaneval):
    assert v.humaneval_path().name == "HumanEval.jsonl.gz"
    assert len(humaneval) == 164
    assert humaneval[0]["task_id"] == "HumanEval/0" and humaneval[-1]["task_id"] == "HumanEval/163"
    assert all({"prompt", "canonical_solution", "test", "entry_point"} <= set(p) for p in humaneval)
    program = v.humaneval_program(humaneval[0], humaneval[0]["canonical_solution"])
    assert program.startswith(humaneval[0]["prompt"]) and program.rstrip().endswith("check(has_close_elements)")


def test_humaneval_canonical_solutions_all_pass(humaneval, no_leftovers):
    results = v.check_humaneval_batch(humaneval, [p["canonical_solution"] for p in humaneval])
    failures = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(humaneval, results) if not r.passed]
    assert not failures


def test_humaneval_return_none_solutions_all_fail(humaneval, no_leftovers):
    results = v.check_humaneval_batch(humaneval, ["    return None\n"] * len(humaneval))
    passed = [p["task_id"] for p, r in zip(humaneval, results) if r.passed]
    assert not passed
    assert {r.status for r in results} == {"failed"}


def test_humaneval_perturbed_return_values_all_fail(humaneval, no_leftovers):
    completions = [p["canonical_solution"] + PERTURBATION.format(name=p["entry_point"]) for p in humaneval]
    results = v.check_humaneval_batch(humaneval, completions)
    passed = [p["task_id"] for p, r in zip(humaneval, results) if r.passed]
    assert not passed
    assert all("AssertionError" in r.stderr for r in results)  # the tests ran and caught the wrong values
