"""The GPU check in one command (issue 11): everything a short, lent GPU session should run, each part
time-boxed, every result on disk as soon as its part ends.

    PYTHONPATH=. python3 -m curvrate_fast gpu-check --out DIR [--budget SECONDS] [--smoke]
    python bench/gpu_check.py --out DIR [--budget SECONDS] [--smoke] [--sections a,b] [--commit SHA]

No GPU has run this project's Triton kernels before; a lent GPU comes rarely, for minutes, without
network, with its own torch and triton. So this script needs nothing but the checkout (run with
``PYTHONPATH=.``, the package need not be installed), stays inside ``--budget`` seconds (default 480)
whatever hangs, and leaves a few flat files in DIR (at most 8 come back from such a machine):

- ``gpu_check.json``: everything, rewritten after every section (and before the first);
- ``gpu_check.md``: the summary: device, versions, commit, date, one row per section, key numbers;
- ``gpu_check_console.log``: what the sections printed (tracebacks included);
- ``gpu_check_pytest.log``: the test run's output;
- ``gpu_check_kernels.md``: bench/bench_kernels.py's tables; ``gpu_check_workloads.md``: the
  benchmark suite's tables (bench/bench_suite.py).

Sections, in this order, each in its own subprocess with a hard timeout (a CUDA hang or crash, or an
illegal memory access that poisons the CUDA context, ends only that section), each with a share of
what is left of the budget (time a section leaves unused goes to the later ones):

1. ``env``: the import and environment smoke. Python, torch, CUDA, the device (name, capability,
   memory, multiprocessors, L2), ``nvidia-smi``'s read-out (clocks, power: is the card in a normal
   state?), triton compiling and running one trivial kernel (is the toolchain sane, apart from our
   code?), where ``curvrate_fast`` and its kernels were imported from (checkout or installed), how the
   kernels were registered, one call of each kernel family against the float64 reference, and one
   engine call on the ``auto`` backend. Without CUDA (and without --smoke) the later sections are
   skipped and the exit status is 2.
2. ``pytest``: the ``gpu``-marked tests and the Triton kernel tests (tests/test_triton_kernels.py,
   test_linear_fused.py, test_triton_ce_split.py, test_engine_triton_backend.py) on CUDA tensors,
   compiled by the real Triton compiler (so far they ran only through the interpreter). A pytest
   subprocess; a plugin records every test's outcome as it finishes (a run cut short keeps its counts
   and names the tests that were running). ``CURVRATE_TRITON_AUTOTUNE=0`` makes each kernel variant
   compile one config instead of five or six (correctness does not depend on the config), and
   pytest-xdist (4 workers) and pytest-timeout are used when installed.
3. ``kernels``: bench/bench_kernels.py at full size: the copy bandwidth, the activation jets at 16M
   elements per coefficient (forward and backward kernels as a fraction of the copy bandwidth, against
   the reference chain, eager and compiled), the linear jet's paths (cuBLAS + fused epilogue, the fused
   Triton GEMM, the per-shape ``auto`` choice), the cross-entropy jet at 32k and 128k classes (the
   split path); every kernel first checked against float64. Then the autotuner's choices and
   ``linear_impl_choices()``. Each of its three parts gets a share of the section's time; cases past
   it are recorded as skipped.
4. ``workloads``: bench/bench_suite.py: the per-sample loss derivatives of orders 1–4 plus
   the backward of mean|d| for the MLP 784 and the paper's MNIST CNN (batch 128, one direction),
   ours (Triton on CUDA) against nested autograd (target ≥ 10×) and the reference rules, each first
   checked in float64; the CRR training step against a plain step at the paper's settings (MNIST
   CNN, Two Moons) and for a small transformer LM; last, the reference rules compiled by
   ``torch.compile`` (a subprocess with its own timeout), against which ours should be ≥ 1.5×.

``--smoke`` runs all of it on CPU through the Triton interpreter (TRITON_INTERPRET=1 is set for every
section before anything imports a kernel) with tiny shapes and few tests: a test of this script
(tests/test_gpu_check.py), not a measurement. Exit status: 0 when every section passed, 1 when one
failed, raised or ran out of time, 2 without a GPU (not in smoke mode) or on bad arguments.

Only the standard library is imported here at module level: the parent process never touches torch
or CUDA, so it always gets to write its files.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SMOKE_LABEL = "smoke (CPU, Triton interpreter, tiny shapes: not a measurement)"
FILES = {"json": "gpu_check.json", "md": "gpu_check.md", "console": "gpu_check_console.log",
         "pytest": "gpu_check_pytest.log", "kernels": "gpu_check_kernels.md",
         "workloads": "gpu_check_workloads.md"}
DEFAULT_BUDGET_S = 480.0

#: (name, title, share of the budget still left when the section starts, relative to the later ones)
SECTIONS = (
    ("env", "Import and environment smoke", 0.10),
    ("pytest", "GPU tests and Triton kernel tests on CUDA tensors", 0.28),
    ("kernels", "Kernels: float64 checks, then do_bench against copy bandwidth and references", 0.28),
    ("workloads", "Workloads: derivative steps and CRR training steps", 0.34),
)
#: seconds a section gets at least (at most half of what is left), whatever its share: the env
#: section is cheap but must survive a slow first import of torch and a cold Triton cache
MIN_ALLOT_S = {"env": 30.0}
SECTION_NAMES = tuple(s[0] for s in SECTIONS)

KERNEL_TEST_FILES = ("tests/test_triton_kernels.py", "tests/test_linear_fused.py",
                     "tests/test_triton_ce_split.py", "tests/test_engine_triton_backend.py")
#: smoke mode: a few quick interpreter tests plus the gpu-marked ones (skipped without CUDA), enough
#: to prove the pytest plumbing (plugin, counts, deselection, log) end to end
SMOKE_PYTEST_K = "test_bad_arguments or test_double_backward_raises or gpu"
#: share of the kernels section for each of bench_kernels' parts (the copy bandwidth runs first, untimed)
KERNEL_PART_SHARES = {"activation": 0.4, "linear": 0.35, "cross_entropy": 0.25}
#: the targets the workloads summary states (issue 5): ours vs nested autograd, vs compiled reference
TARGET_VS_BASELINE = 10.0
TARGET_VS_COMPILE = 1.5
#: a test hook: "section=raise|hang|crash,..." makes that section's subprocess fail that way first
INJECT_ENV = "GPU_CHECK_INJECT"


# =============================================================================================
# Small helpers (standard library only)
# =============================================================================================

def _utc(fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    return time.strftime(fmt, time.gmtime())


def _tail(text: str, n: int = 3000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a process killed in the
    middle leaves the previous version, never half a file."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_tail(path: Path, n: int = 3000, start: int = 0) -> str:
    """The last ``n`` bytes of ``path`` after offset ``start``, as text."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the budget counts the
    interpreter's start and the imports before main() too."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - float(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def git_commit(root: Path = ROOT) -> Dict[str, Any]:
    """The checked-out commit, read from ``.git`` directly (a machine the working tree was copied to
    may have no git program, or no ``.git``): ``{"commit": sha or "unknown", "source": how, "dirty":
    True/False/None}``. ``dirty`` needs the git program (None without it)."""
    out: Dict[str, Any] = {"commit": "unknown", "source": "no .git found", "dirty": None}
    try:
        git = root / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            line = git.read_text().strip()
            if line.startswith("gitdir:"):
                git = (root / line.split(":", 1)[1].strip()).resolve()
        if not (git / "HEAD").is_file():
            return out
        common = git
        if (git / "commondir").is_file():  # a worktree keeps its refs in the main repository
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        sha = None
        if head.startswith("ref:"):
            ref = head.split(":", 1)[1].strip()
            for base in (git, common):
                if (base / ref).is_file():
                    sha = (base / ref).read_text().strip()
                    break
            if sha is None and (common / "packed-refs").is_file():
                for line in (common / "packed-refs").read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        sha = parts[0]
            out["source"] = f".git ({ref})"
        else:
            sha, out["source"] = head, ".git (detached HEAD)"
        if sha and re.fullmatch(r"[0-9a-f]{40}", sha):
            out["commit"] = sha
    except OSError as e:
        out["source"] = f"unreadable .git: {e}"
        return out
    if out["commit"] != "unknown" and shutil.which("git"):
        try:
            p = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(root),
                               capture_output=True, text=True, timeout=15, check=False)
            if p.returncode == 0:
                out["dirty"] = bool(p.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def _fmt(v: Any, spec: str = "{:.3g}") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return spec.format(v)
    return str(v)


def _md_cell(v: Any) -> str:
    return _fmt(v).replace("|", "/").replace("\n", " ")


def _md_row(*cells: Any) -> str:
    """One markdown table row; a list of strings gives the header and its separator."""
    return "| " + " | ".join(_md_cell(c) if not isinstance(c, str) else c.replace("\n", " ") for c in cells) + " |"


def _md_head(*names: str) -> List[str]:
    return [_md_row(*names), "|" + "---|" * len(names)]


def _pct(v) -> str:
    return _fmt(v, "{:.0%}")


def _x(v) -> str:
    return _fmt(v, "{:.2f}×")


# =============================================================================================
# The parent: budget, subprocesses, files
# =============================================================================================

def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m curvrate_fast gpu-check",
        description="The GPU check in one command: environment, the GPU tests on CUDA, the Triton kernels "
                    "against float64 and timed, the workloads against nested autograd and torch.compile; "
                    "time-boxed, results written to --out as each section ends (bench/README.md).")
    p.add_argument("--out", default=None, help="output folder (required; created; at most 6 flat files)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run, hangs included (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--smoke", action="store_true",
                   help="CPU only: every section through the Triton interpreter with tiny shapes "
                        "(a test of this script, not a measurement)")
    p.add_argument("--sections", default=",".join(SECTION_NAMES),
                   help=f"comma-separated subset of {','.join(SECTION_NAMES)} (e.g. to rerun one); the "
                        "others are recorded as not selected")
    p.add_argument("--commit", default=None,
                   help="record this commit (where the tree was copied without .git, say)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is None:
        if not args.out:
            p.error("--out DIR is required")
        args.sections = [s for s in args.sections.split(",") if s]
        bad = [s for s in args.sections if s not in SECTION_NAMES]
        if bad or not args.sections:
            p.error(f"--sections: unknown or empty {bad}; choose from {','.join(SECTION_NAMES)}")
        if not args.budget > 0:
            p.error("--budget must be positive")
    return args


def _child_env(smoke: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # a GPU run must compile, never interpret
    return env


class Run:
    """The parent's state: the results document, the files, the clock."""

    def __init__(self, args):
        self.args = args
        self.smoke = bool(args.smoke)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic() - _process_age_s()
        self.budget = float(args.budget)
        # kept back from the sections for the last write and the exit
        self.reserve = min(5.0, max(0.5, 0.02 * self.budget))
        self.end = self.t0 + self.budget - self.reserve
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        commit = git_commit()
        if args.commit:
            commit = {"commit": args.commit, "source": "--commit", "dirty": None}
        self.doc: Dict[str, Any] = {
            "meta": {"tool": "bench/gpu_check.py", "mode": SMOKE_LABEL if self.smoke else "gpu",
                     "smoke": self.smoke, "budget_s": self.budget, "date": _utc(),
                     "commit": commit["commit"], "commit_source": commit["source"], "dirty": commit["dirty"],
                     "argv": sys.argv[1:], "out": str(self.out), "host": platform.node(),
                     "python_parent": platform.python_version(), "files": dict(FILES),
                     "device": None, "torch": None, "triton": None, "cuda": None, "wall_s": 0.0},
            "sections": {name: {"name": name, "title": title, "status": "pending"}
                         for name, title, _ in SECTIONS},
        }
        if not self.smoke and os.environ.get("TRITON_INTERPRET") == "1":
            self.doc["meta"]["note"] = "TRITON_INTERPRET=1 was set; removed for the sections (a GPU run compiles)"
        (self.out / FILES["console"]).write_text(f"gpu_check console log, {_utc()}\n", encoding="utf-8")

    def left(self) -> float:
        return self.end - time.monotonic()

    def write(self) -> None:
        self.doc["meta"]["wall_s"] = round(time.monotonic() - self.t0, 1)
        _write_atomic(self.out / FILES["json"], json.dumps(self.doc, indent=1, default=str))
        _write_atomic(self.out / FILES["md"], markdown(self.doc))

    def run_section(self, name: str, allot: float) -> Dict[str, Any]:
        """Run one section's subprocess for at most ``allot`` seconds; returns its record."""
        rec = self.doc["sections"][name]
        rec.update(status="running", allotted_s=round(allot, 1), started=_utc())
        self.write()
        result_path = self.tmp / f"{name}.json"
        spec = {"section": name, "smoke": self.smoke, "result": str(result_path), "out": str(self.out),
                "allot_s": allot, "deadline": time.time() + allot}
        log_path = self.out / (FILES["pytest"] if name == "pytest" else FILES["console"])
        mode = "w" if name == "pytest" else "a"
        t0 = time.monotonic()
        timed_out = False
        with open(log_path, mode, encoding="utf-8") as log:
            log.write(f"\n===== section {name}: {rec['title']} ({allot:.0f} s allotted, {_utc()}) =====\n")
            log.flush()
            log_start = log.tell()
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                                    cwd=str(ROOT), env=_child_env(self.smoke), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=allot)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.returncode
                log.write(f"\n===== section {name}: killed after {allot:.0f} s (its time box) =====\n")
        rec["wall_s"] = round(time.monotonic() - t0, 1)
        rec["returncode"] = rc
        res = _read_json(result_path)
        if res is not None:
            rec["result"] = res
        if timed_out:
            rec["status"] = "timeout"
            rec["error"] = (f"not done after its {allot:.0f} s: killed; what it finished is kept"
                            + (f"; running then: {res.get('running')}" if res and res.get("running") else ""))
        elif res is None or "status" not in res:
            rec["status"] = "error"
            rec["error"] = (f"the section's process exited with status {rc} before reporting; its output "
                            f"ends:\n{_file_tail(log_path, 2000, log_start)}")
        else:
            rec["status"] = res["status"]
            if res.get("error"):
                rec["error"] = res["error"]
        try:
            rec["summary"] = SUMMARIES[name](rec.get("result") or {}, self.smoke)
        except Exception as e:  # noqa: BLE001 - a summary bug must not lose the section's data
            rec["summary"] = {"text": f"(summary failed: {type(e).__name__}: {e})"}
        return rec


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the section's whole process group (its pytest workers, compile subprocesses): a process
    stuck in a CUDA call may ignore anything milder."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.kill()
        except OSError:
            pass
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver call): leave it, go on
        pass


def main(argv=None) -> int:
    args = _parse(argv)
    if args._child is not None:
        return child_main(json.loads(args._child))
    run = Run(args)
    shares = {name: share for name, _, share in SECTIONS}
    print(f"gpu-check: {run.doc['meta']['mode']}, budget {run.budget:.0f} s, results in {run.out}", flush=True)
    for name in SECTION_NAMES:
        if name not in args.sections:
            run.doc["sections"][name].update(status="not selected", summary={"text": "not in --sections"})
    run.write()
    exit_code = 0
    no_gpu = False
    todo = [n for n in SECTION_NAMES if n in args.sections]
    for i, name in enumerate(todo):
        rec = run.doc["sections"][name]
        if no_gpu:
            rec.update(status="skipped", summary={"text": "skipped: no CUDA GPU is visible (section env)"})
            run.write()
            continue
        left = run.left()
        allot = left * shares[name] / sum(shares[n] for n in todo[i:])
        if i < len(todo) - 1:
            allot = max(allot, min(MIN_ALLOT_S.get(name, 0.0), 0.5 * left))
        if allot < 1.0:
            rec.update(status="skipped", summary={"text": f"skipped: the budget is spent ({left:.1f} s left)"})
            exit_code = 1
            run.write()
            continue
        print(f"[{name}] {rec['title']} (up to {allot:.0f} s)", flush=True)
        rec = run.run_section(name, allot)
        if name == "env":
            meta = (rec.get("result") or {}).get("meta") or {}
            for k in ("device", "torch", "triton", "cuda", "python"):
                if meta.get(k) is not None:
                    run.doc["meta"][k] = meta[k]
            if not run.smoke and meta.get("cuda_available") is not True:
                no_gpu = True
        if rec["status"] != "ok":
            exit_code = 1
        print(f"[{name}] {rec['status']} in {rec['wall_s']:.0f} s: {rec['summary'].get('text', '')}", flush=True)
        if rec.get("error") and rec["status"] != "failed":
            print("  " + _tail(rec["error"], 1200).replace("\n", "\n  "), flush=True)
        run.write()
    run.write()
    shutil.rmtree(run.tmp, ignore_errors=True)
    print(f"gpu-check: done in {run.doc['meta']['wall_s']:.0f} s of {run.budget:.0f}; wrote "
          + ", ".join(sorted(p.name for p in run.out.iterdir() if p.name.startswith("gpu_check"))))
    print(summary_table(run.doc))
    if no_gpu:
        print("gpu-check: no CUDA GPU is visible here; nothing was measured (--smoke tests this script on CPU)",
              file=sys.stderr)
        return 2
    return exit_code


# =============================================================================================
# The child: one section, its partial result saved after every item
# =============================================================================================

class Result:
    """A section's result document in a file the parent reads, saved atomically after every item so
    that a section killed at its time box still reports what it finished."""

    def __init__(self, path: str, spec: dict):
        self.path = Path(path)
        self.data: Dict[str, Any] = {"section": spec["section"], "items": []}
        self.t0 = time.monotonic()
        # stop starting new work a little before the hard kill: room to save and exit
        margin = max(1.0 if spec["smoke"] else 3.0, 0.06 * spec["allot_s"])
        self.soft_end = time.monotonic() + (spec["deadline"] - time.time()) - margin

    def left(self) -> float:
        return self.soft_end - time.monotonic()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        _write_atomic(self.path, json.dumps(self.data, indent=1, default=str))


def _inject(section: str) -> None:
    for part in os.environ.get(INJECT_ENV, "").split(","):
        name, _, how = part.partition("=")
        if name.strip() != section:
            continue
        how = how.strip()
        if how == "raise":
            raise RuntimeError(f"injected failure ({INJECT_ENV})")
        if how == "hang":
            time.sleep(10 ** 6)
        if how == "crash":
            os._exit(3)


def child_main(spec: dict) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    R = Result(spec["result"], spec)
    R.save()
    try:
        _inject(spec["section"])
        CHILDREN[spec["section"]](R, spec)
        R.data.setdefault("status", "ok")
        R.data.pop("running", None)
        R.save()
        return 0
    except BaseException as e:  # noqa: BLE001 - recorded for the parent, which goes on
        traceback.print_exc()
        R.data["status"] = "error"
        R.data["error"] = _tail(f"{type(e).__name__}: {e}\n" + traceback.format_exc(), 4000)
        R.save()
        return 1


def _item(R: Result, name: str, fn: Callable[[], Any], min_s: float = 0.0) -> Any:
    """Run one item of a section: its record (status, seconds, value or error) goes into
    ``R.data["items"]`` and the result is saved. Not started when fewer than ``min_s`` seconds are
    left (recorded as skipped)."""
    rec: Dict[str, Any] = {"item": name}
    R.data["items"].append(rec)
    if R.left() < min_s:
        rec.update(status="skipped", note=f"time box: {max(R.left(), 0):.0f} s left")
        R.save()
        return None
    R.data["running"] = name
    R.save()
    t0 = time.perf_counter()
    try:
        value = fn()
        rec["status"] = "ok"
        return value
    except Exception as e:  # noqa: BLE001 - one item's failure is a result
        print(f"[{R.data['section']}] {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        rec.update(status="error", error=_tail(f"{type(e).__name__}: {e}\n" + traceback.format_exc(), 2500))
        return None
    finally:
        rec["s"] = round(time.perf_counter() - t0, 2)
        R.data.pop("running", None)
        R.save()


# -- 1. env -----------------------------------------------------------------------------------
tl = None  # triton.language, bound by _probe_kernel(): a jit function reads its module's globals


def _probe_kernel():
    """A trivial Triton kernel (out = x + 2y): whether the toolchain compiles and runs anything at all,
    apart from this project's kernels."""
    global tl
    import triton
    import triton.language as tl  # noqa: F811

    @triton.jit
    def probe_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, x + 2.0 * y, mask=mask)

    return triton, probe_add_kernel


def _rel(torch, a, b) -> float:
    """max over the leading axis of ‖a_k − b_k‖ / ‖b_k‖ (float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return math.inf
    worst = 0.0
    for k in range(b.shape[0]):
        den = float(torch.linalg.vector_norm(b[k]))
        num = float(torch.linalg.vector_norm(a[k] - b[k]))
        worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else math.inf))
    return worst


def section_env(R: Result, spec: dict) -> None:
    """Section 1: is this machine what the rest assumes? Python and torch import, CUDA is visible, the
    device and the card's state (``nvidia-smi``, read-only), Triton compiles and runs a trivial kernel
    (a broken toolchain shows here, not as a hundred failing tests), the package and its kernels are
    found (checkout or installed) and registered as ``triton_op`` (compiled, not interpreted), each
    kernel family gives the float64 answer once, and the engine runs on the ``auto`` backend. Each
    check is an item with ``ok`` (None: information only); a failed check makes the section
    "failed"; without CUDA (not in smoke mode) the parent skips the rest."""
    smoke = spec["smoke"]
    meta: Dict[str, Any] = {"python": platform.python_version(), "interpreter": smoke}
    R.data["meta"] = meta
    checks: List[dict] = []
    R.data["checks"] = checks

    def check(name, fn, required=True, min_s=0.0):
        def run():
            ok, value = fn()
            checks.append({"check": name, "ok": ok, "value": value})
            return ok
        ok = _item(R, name, run, min_s)
        if R.data["items"][-1]["status"] != "ok":
            checks.append({"check": name, "ok": False if required else None,
                           "value": R.data["items"][-1].get("error") or R.data["items"][-1].get("note")})
        return ok

    check("python", lambda: (True, {"version": platform.python_version(), "executable": sys.executable,
                                    "platform": platform.platform()}))
    check("environment", lambda: (None, {k: os.environ.get(k) for k in
                                         ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTHONPATH",
                                          "CURVRATE_BACKEND", "CURVRATE_LINEAR_IMPL", "CURVRATE_DISABLE_TRITON",
                                          "TRITON_CACHE_DIR")}), required=False)
    state: Dict[str, Any] = {}

    def torch_import():
        import torch
        state["torch"] = torch
        meta.update(torch=torch.__version__, cuda=torch.version.cuda)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return True, {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                      "threads": torch.get_num_threads()}
    if not check("torch import", torch_import):
        R.data["status"] = "failed"
        return
    torch = state["torch"]

    def cuda():
        avail = bool(torch.cuda.is_available())
        meta["cuda_available"] = avail
        value = {"available": avail, "devices": torch.cuda.device_count() if avail else 0}
        if smoke:
            return True, dict(value, note="not needed: smoke mode runs on CPU")
        return avail, value
    check("CUDA visible", cuda)
    if not smoke and not meta.get("cuda_available"):
        meta["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU"
        R.data["status"] = "failed"  # the rest would test the CPU; the parent skips the later sections
        return
    gpu = not smoke
    dev = torch.device("cuda" if gpu else "cpu")

    def device():
        if not gpu:
            meta["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores), Triton interpreter"
            return None, meta["device"]
        props = torch.cuda.get_device_properties(dev)
        l2 = getattr(props, "L2_cache_size", None)
        value = {"name": torch.cuda.get_device_name(dev), "capability": f"{props.major}.{props.minor}",
                 "memory_GiB": round(props.total_memory / 2**30, 1),
                 "multiprocessors": props.multi_processor_count, "L2_MiB": l2 / 2**20 if l2 else None}
        meta.update(device=value["name"], capability=value["capability"], memory_GiB=value["memory_GiB"])
        return True, value
    check("device", device)

    if gpu:
        def smi():
            exe = shutil.which("nvidia-smi")
            if exe is None:
                return None, "nvidia-smi not on PATH"
            q = ("name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,"
                 "temperature.gpu,power.draw,power.limit,utilization.gpu,persistence_mode")
            p = subprocess.run([exe, f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True,
                               timeout=20, check=False)
            return None, (p.stdout or p.stderr).strip()
        check("nvidia-smi (read-only query)", smi, required=False)

    def triton_import():
        import triton
        meta["triton"] = triton.__version__
        value = {"triton": triton.__version__, "file": str(Path(triton.__file__).parent)}
        try:
            from triton.runtime import driver
            target = driver.active.get_current_target()
            value["target"] = f"{target.backend} {target.arch}"
        except Exception as e:  # noqa: BLE001 - information only; the interpreter has no target
            value["target"] = f"n/a ({type(e).__name__})"
        return True, value
    if not check("triton import", triton_import):
        R.data["status"] = "failed"
        return

    def probe():
        triton, kernel = _probe_kernel()
        n = 3000
        x = torch.randn(n, device=dev)
        y = torch.randn(n, device=dev)
        out = torch.full_like(x, float("nan"))
        t0 = time.perf_counter()
        kernel[(triton.cdiv(n, 1024),)](x, y, out, n, BLOCK=1024)
        if gpu:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        kernel[(triton.cdiv(n, 1024),)](x, y, out, n, BLOCK=1024)
        if gpu:
            torch.cuda.synchronize()
        err = float((out - (x + 2 * y)).abs().max())
        return err < 1e-5, {"max_abs_err": err, "first_call_s (compile)": round(first, 3),
                            "second_call_ms": round((time.perf_counter() - t0) * 1e3, 3)}
    check("triton compiles and runs a trivial kernel", probe)

    def package():
        import curvrate_fast as cf
        from curvrate_fast.functions import _backend
        kmod = _backend.kernels()
        pkg, kern = Path(cf.__file__).resolve().parent, Path(kmod.__file__).resolve().parent
        # installed: curvrate_fast/triton_kernels/; a checkout: triton_kernels/ beside curvrate_fast/
        # (an editable install elsewhere can serve the kernels of another tree: worth seeing)
        layout = ("installed" if kern.parent == pkg else "checkout" if kern.parent == pkg.parent
                  else "kernels NOT beside this package")
        return True, {"curvrate_fast": str(pkg), "version": cf.__version__, "triton_kernels": str(kern),
                      "layout": layout}
    check("curvrate_fast import (kernels found)", package)

    def registration():
        from curvrate_fast.functions import _backend, _ops
        flags = {n: _backend.kernel_module(n).INTERPRET
                 for n in ("activation_jet", "cross_entropy_jet", "linear_jet")}
        mode = _ops.registration_mode()
        want = "custom_op" if smoke else "triton_op"
        return set(flags.values()) == {smoke} and mode == want, {"interpreted": flags, "registration": mode,
                                                                 "expected": want}
    check("kernel modules and operator registration", registration)

    def kernels_once():
        from curvrate_fast import functions as CF
        from curvrate_fast.functions.activation import reference_activation_jet
        from curvrate_fast.functions.cross_entropy import reference_cross_entropy_jet
        g = torch.Generator(device="cpu").manual_seed(0)
        K = 4
        c = torch.randn(2, 3, 257, generator=g).to(dev)
        y = CF.activation_jet(c, "tanh", K)
        e_act = _rel(torch, y, reference_activation_jet(c.double(), "tanh", K))
        z = torch.randn(2, 5, 1000, generator=g).to(dev)
        t = torch.randint(0, 1000, (5,), generator=g).to(dev)
        e_ce = _rel(torch, CF.cross_entropy_jet(z, t, K), reference_cross_entropy_jet(z.double(), t, K))
        x = torch.randn(2, 33, 40, generator=g).to(dev)
        W = (torch.randn(24, 40, generator=g) / 40 ** 0.5).to(dev)
        b = torch.randn(24, generator=g).to(dev)
        pre = torch.stack([xi.double() @ W.double().T for xi in x])
        pre = torch.cat([(pre[0] + b.double()).unsqueeze(0), pre[1:]])
        ref = reference_activation_jet(pre, "gelu", K)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            e_fused = _rel(torch, CF.linear_activation_jet(x, W, b, "gelu", K, impl="fused"), ref)
            e_cublas = _rel(torch, CF.linear_activation_jet(x, W, b, "gelu", K, impl="cublas"), ref)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        errs = {"activation tanh": e_act, "cross-entropy": e_ce, "linear+gelu fused": e_fused,
                "linear+gelu cublas": e_cublas}
        return all(v < 1e-4 for v in errs.values()), {"rel_err vs float64": errs}
    check("one call of each kernel family vs float64", kernels_once)

    def engine():
        import curvrate_fast as cf
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dev)
        x = torch.randn(8, 6, device=dev)
        yy = torch.randint(0, 4, (8,), device=dev)
        u = torch.nn.functional.normalize(torch.randn(8, 6, device=dev), dim=1)
        d_auto = cf.loss_directional_derivatives(model, x, yy, u, 4, backend="auto")
        d_ref = cf.loss_directional_derivatives(model.double(), x.double(), yy, u.double(), 4, backend="reference")
        err = _rel(torch, d_auto, d_ref)
        return err < 1e-3, {"rel_err auto (float32) vs reference (float64)": err}
    check("engine: loss derivatives, backend auto", engine)
    R.data["status"] = "failed" if any(c["ok"] is False for c in checks) else "ok"


# -- 2. pytest --------------------------------------------------------------------------------
def _pytest_files() -> Dict[str, List[str]]:
    """The kernel test files (every test) and the other files with gpu-marked tests (those only)."""
    full = [f for f in KERNEL_TEST_FILES if (ROOT / f).is_file()]
    marked = []
    for p in sorted((ROOT / "tests").glob("test_*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if rel in full:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except OSError:
            continue
        if re.search(r"mark\.gpu\b|^@gpu\b", text, re.MULTILINE):
            marked.append(rel)
    return {"full": full, "gpu_only": marked}


GPU_ONLY_ENV = "GPU_CHECK_GPU_ONLY_FILES"


def pytest_collection_modifyitems(config, items):
    """A pytest hook, active where the pytest section loads this file as a plugin (``-p gpu_check``,
    also in pytest-xdist's workers, which collect): in the files listed in $GPU_CHECK_GPU_ONLY_FILES
    only the ``gpu``-marked tests stay selected."""
    only = {f for f in os.environ.get(GPU_ONLY_ENV, "").split(",") if f}
    if not only:
        return
    keep, drop = [], []
    for it in items:
        path = it.nodeid.split("::", 1)[0]
        (drop if path in only and it.get_closest_marker("gpu") is None else keep).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _pytest_recorder(R: Result):
    """The pytest plugin object of the pytest section (see :class:`_PytestRecorder`)."""
    import pytest

    class Recorder(_PytestRecorder):
        @pytest.hookimpl(optionalhook=True)
        def pytest_xdist_node_collection_finished(self, node, ids):
            # with xdist the workers collect; the controller learns the count here
            self.R.data["collected"] = max(self.R.data.get("collected") or 0, len(ids))
            self._save(force=True)

    return Recorder(R)


class _PytestRecorder:
    """A pytest plugin for the controller process (with or without xdist) that records every test's
    outcome as it finishes, the tests running now, and the collection errors, saving the section's
    result as it goes (a run killed at its time box keeps its counts)."""

    def __init__(self, R: Result):
        self.R = R
        self.outcomes: Dict[str, str] = {}
        self.failures: Dict[str, str] = {}
        self.durations: Dict[str, float] = {}
        self.running: set = set()
        self._last_save = 0.0
        R.data.update(counts={}, failures=self.failures, collect_errors=[], running=[])

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < 0.5:
            return
        self._last_save = now
        counts: Dict[str, int] = {}
        for o in self.outcomes.values():
            counts[o] = counts.get(o, 0) + 1
        self.R.data["counts"] = counts
        self.R.data["running"] = sorted(self.running)
        slow = sorted(self.durations.items(), key=lambda kv: -kv[1])[:10]
        self.R.data["slowest"] = [[k, round(v, 2)] for k, v in slow]
        self.R.save()

    def pytest_collection_finish(self, session):
        self.R.data["collected"] = len(session.items)
        self._save(force=True)

    def pytest_collectreport(self, report):
        if report.failed:
            self.R.data["collect_errors"].append({"node": report.nodeid,
                                                  "error": _tail(str(report.longrepr), 1500)})
            self._save(force=True)

    def pytest_runtest_logstart(self, nodeid, location):
        self.running.add(nodeid)
        self._save()

    def pytest_runtest_logreport(self, report):
        nid = report.nodeid
        if report.when == "setup":
            if report.failed:
                self.outcomes[nid] = "error"
            elif report.skipped:
                self.outcomes[nid] = "skipped"
        elif report.when == "call":
            self.durations[nid] = float(report.duration)
            if hasattr(report, "wasxfail"):
                self.outcomes[nid] = "xfailed" if report.skipped else "xpassed"
            else:
                self.outcomes[nid] = report.outcome  # passed / failed / skipped
        elif report.when == "teardown" and report.failed:
            self.outcomes[nid] = "error"
        if report.failed:
            self.failures[nid] = _tail(getattr(report, "longreprtext", "") or str(report.longrepr), 1500)
        if report.when == "teardown":
            self.running.discard(nid)
        self._save(force=report.failed)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.running.discard(nodeid)
        self._save()

    def pytest_sessionfinish(self, session, exitstatus):
        self.R.data["exitstatus"] = int(exitstatus)
        self._save(force=True)


def section_pytest(R: Result, spec: dict) -> None:
    """Section 2: the kernel tests, so far run only through the interpreter, now on CUDA tensors and
    compiled by the real Triton compiler (which rejects or miscompiles what the interpreter accepts,
    and the reverse), plus the ``gpu``-marked tests (realistic shapes, fp16/bf16/tf32 tolerances). In
    this process through ``pytest.main`` (its output is the section's log), the recorder plugin saving
    the counts as tests finish."""
    import pytest
    smoke = spec["smoke"]
    files = _pytest_files()
    args = [*files["full"], *files["gpu_only"], "-v", "-rfE", "--tb=short", "--continue-on-collection-errors"]
    if files["gpu_only"]:
        os.environ[GPU_ONLY_ENV] = ",".join(files["gpu_only"])
        # xdist's workers (other processes) import the plugin by name: this folder on their path
        os.environ["PYTHONPATH"] = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        args += ["-p", "gpu_check"]
    if smoke:
        args += ["-k", SMOKE_PYTEST_K]
    else:
        # correctness does not depend on the autotuner's pick: one config per kernel variant
        os.environ["CURVRATE_TRITON_AUTOTUNE"] = "0"
        if importlib.util.find_spec("xdist") is not None:
            args += ["-n", str(max(1, min(4, (os.cpu_count() or 1) // 2)))]
        if importlib.util.find_spec("pytest_timeout") is not None:
            args += [f"--timeout={max(60, int(spec['allot_s'] * 0.4))}"]
    R.data.update(files=files, args=list(args), autotune=os.environ.get("CURVRATE_TRITON_AUTOTUNE", "1"))
    recorder = _pytest_recorder(R)
    rc = pytest.main(list(args), plugins=[recorder])
    recorder._save(force=True)
    R.data["exitstatus"] = int(rc)
    counts = R.data.get("counts", {})
    bad = counts.get("failed", 0) + counts.get("error", 0) + len(R.data.get("collect_errors", []))
    R.data["status"] = "ok" if int(rc) == 0 and bad == 0 and counts.get("passed", 0) > 0 else "failed"


# -- 3. kernels -------------------------------------------------------------------------------
def _load_bench_kernels():
    spec = importlib.util.spec_from_file_location("_gpu_check_bench_kernels", HERE / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _autotune_choices() -> Dict[str, Dict[str, str]]:
    """The configs Triton's autotuner picked, per autotuned kernel and key."""
    from curvrate_fast.functions._backend import kernel_module
    out: Dict[str, Dict[str, str]] = {}
    for mod_name in ("activation_jet", "linear_jet", "cross_entropy_jet"):
        mod = kernel_module(mod_name)
        for attr, obj in vars(mod).items():
            cache = getattr(obj, "cache", None)
            if isinstance(cache, dict) and hasattr(obj, "configs"):
                out[f"{mod_name}.{attr}"] = {str(k): str(v) for k, v in cache.items()}
    return out


def _linear_choices() -> List[Dict[str, str]]:
    from curvrate_fast.functions import linear_impl_choices
    names = ("device", "dtype", "stored", "rows_log2", "in", "out", "order", "kind", "bias", "tf32", "backward")
    return [dict(zip(names, map(str, k)), choice=v) for k, v in linear_impl_choices().items()]


def section_kernels(R: Result, spec: dict) -> None:
    """Section 3: bench/bench_kernels.py's cases at full size, each part within its share of the
    section's time: are the memory-bound kernels near the copy bandwidth (what they can at best
    reach), faster than the chain of torch ops they replace, and right in float64 on the real
    compiler's code? Then what the autotuner and ``linear_impl="auto"`` chose on this GPU."""
    bk = _load_bench_kernels()
    smoke = spec["smoke"]
    if smoke:
        argv = ["--smoke", "--kinds", "tanh,relu", "--dtypes", "float32"]
    else:
        # full sizes (16M elements per coefficient); torch.compile of the reference chain only while
        # it costs less than a fifth of the section
        argv = ["--compile-budget", f"{0.2 * spec['allot_s']:.0f}"]
    args = bk._parse(argv)
    bk.settle_interpret(args.smoke)
    ctx = bk.setup(args)
    out_md = Path(spec["out"]) / FILES["kernels"]

    def save():
        R.data["results"] = ctx.results
        R.save()
        _write_atomic(out_md, bk._markdown(ctx.results))

    ctx.on_case = save
    parts = [p for p in bk.SECTIONS if p in args.sections]

    def deadline_for(part: str) -> Optional[float]:
        left = R.left()
        if part == "copy":
            return time.monotonic() + left
        later = parts[parts.index(part):]
        return time.monotonic() + left * KERNEL_PART_SHARES[part] / sum(KERNEL_PART_SHARES[p] for p in later)

    R.data["argv"] = argv
    bk.run_sections(ctx, after=save, deadline_for=deadline_for)
    R.data["autotune"] = _item(R, "autotuner choices", _autotune_choices)
    R.data["linear_impl_choices"] = _item(R, "linear_impl_choices()", _linear_choices)
    save()
    skipped = sum(1 for part in ("copy", *bk.SECTIONS) for r in ctx.results.get(part, []) if "skipped" in r)
    R.data["skipped_cases"] = skipped
    R.data["status"] = "failed" if ctx.failed else "ok"


# -- 4. workloads -----------------------------------------------------------------------------
def _bench_suite():
    """The benchmark harness, bench/bench_suite.py beside this script."""
    local = HERE / "bench_suite.py"
    spec = importlib.util.spec_from_file_location("_gpu_check_bench_suite", local)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def section_workloads(R: Result, spec: dict) -> None:
    """Section 4: what a user gets: the derivative step (orders 1–4 + backward) against the paper's
    nested autograd and the reference rules (each checked in float64 first), and a CRR training step
    against a plain one, through bench_suite.run(), one workload per item in the order of what
    matters most; the torch.compile cells last (their inductor compile can take minutes)."""
    import dataclasses

    import torch
    bs = _bench_suite()
    smoke = spec["smoke"]
    if smoke:
        common = dict(device="cpu", batch=2, repeats=(1, 1), budget_s=0.0, warmup=1, memory=False,
                      compile_backend="eager", threads=1, crr_captured=False)
        # the LM at its real size costs seconds per step on a CPU; the code path is the same
        wl = bs.CRR_ONLY_WORKLOADS["lm"]

        def tiny_lm_data(b, g):
            return torch.randn(b, 8, 16, generator=g), torch.randint(0, 32, (b, 8), generator=g)
        bs.CRR_ONLY_WORKLOADS["lm"] = dataclasses.replace(
            wl, make_model=lambda: bs.TinyLM(d_model=16, nhead=2, n_layers=1, vocab=32, seq=8, dim_feedforward=32),
            make_data=tiny_lm_data)
        min_item, min_compile = 1.0, 5.0
    else:
        common = dict(device="cuda", repeats=(3, 20), budget_s=0.5, warmup=2, memory=True)
        min_item, min_compile = 8.0, 30.0
    device = bs.resolve_device(common["device"])
    env = bs.environment(device)
    R.data["env"] = env
    rows: List[dict] = []
    R.data["rows"] = rows
    out_md = Path(spec["out"]) / FILES["workloads"]
    deriv_workloads = ["mnist_cnn", "mlp784"]

    def run_cfg(tag: str, **kw):
        cfg = bs.BenchConfig(**dict(common, **kw))
        got = bs.run(cfg)
        for r in got:
            r["item"] = tag
        rows.extend(got)
        _write_atomic(out_md, bs.format_markdown(rows, env))
        return len(got)

    for w in deriv_workloads:
        _item(R, f"derivatives {w}",
              lambda w=w: run_cfg(f"derivatives {w}", workloads=[w], methods=["baseline", "ours", "reference"],
                                  dirs=[1], orders=[4], crr=False, check=True), min_item)
    for c in ("mnist_cnn_crr", "two_moons_crr", "lm_crr"):
        # methods only matter to derivative steps; listing "cpp" would build the C++ kernels on a CPU
        _item(R, f"CRR {c}", lambda c=c: run_cfg(f"CRR {c}", workloads=[], methods=["ours"], crr=True,
                                                crr_workloads=[c], check=False), min_item)
    for w in (deriv_workloads[1:] if smoke else deriv_workloads):  # smoke: the subprocess path once
        def compile_cell(w=w):
            timeout = max(10.0, min(300.0, R.left() - 2.0))
            return run_cfg(f"compile {w}", workloads=[w], methods=["compile"], dirs=[1], orders=[4], crr=False,
                           check=False, compile_timeout_s=timeout)
        _item(R, f"compile {w}", compile_cell, min_compile)
    _chain_compile_speedups(rows)
    _write_atomic(out_md, bs.format_markdown(rows, env))
    R.save()
    bad_items = [i for i in R.data["items"] if i["status"] == "error"]
    bad_checks = [r for r in rows if r["kind"] == "check" and not r.get("ok")]
    bad_rows = [r for r in rows if r["kind"] in ("deriv", "crr") and "error" in r]
    R.data["status"] = "failed" if (bad_items or bad_checks or bad_rows) else "ok"


def _chain_compile_speedups(rows: List[dict]) -> None:
    """The compile cell runs in its own process beside the reference rules; chain through them:
    speedup vs nested autograd = (baseline/reference here) × (reference/compile there), and ours vs
    compiled = (compile time here, so chained) / ours."""
    for r in rows:
        if r.get("kind") != "deriv" or r.get("method") != "compile" or r.get("speedup_vs_reference") is None:
            continue
        same = {x["method"]: x for x in rows if x.get("kind") == "deriv" and x.get("workload") == r["workload"]
                and x.get("dirs") == r.get("dirs") and x.get("order") == r.get("order") and "median_ms" in x}
        ref, base, ours = same.get("reference"), same.get("baseline"), same.get("ours")
        if ref is None:
            continue
        compile_here = ref["median_ms"] / r["speedup_vs_reference"]
        if base is not None:
            r["speedup"] = base["median_ms"] / compile_here
            r["speedup_note"] = "chained: baseline/reference here × reference/compile in the subprocess"
        if ours is not None:
            ours["speedup_vs_compile"] = compile_here / ours["median_ms"]


CHILDREN: Dict[str, Callable[[Result, dict], None]] = {
    "env": section_env, "pytest": section_pytest, "kernels": section_kernels, "workloads": section_workloads}


# =============================================================================================
# Summaries (parent; plain dicts in, text and markdown out)
# =============================================================================================

def _sum_env(res: dict, smoke: bool) -> dict:
    checks = res.get("checks", [])
    bad = [c["check"] for c in checks if c.get("ok") is False]
    meta = res.get("meta", {})
    if not checks:
        return {"text": "no check ran", "md": "", "failed_checks": []}
    text = (f"{meta.get('device', '?')}; torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}; "
            f"{len(checks) - len(bad)}/{len(checks)} checks fine" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    md = _md_head("check", "ok", "value")
    for c in checks:
        v = c.get("value")
        v = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
        md.append(_md_row(c["check"], c.get("ok"), _tail(v, 600).replace("|", "/")))
    return {"text": text, "md": "\n".join(md), "failed_checks": bad}


def _sum_pytest(res: dict, smoke: bool) -> dict:
    c = res.get("counts", {})
    order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    text = ", ".join(f"{c[k]} {k}" for k in order if c.get(k)) or "no test finished"
    if res.get("collected") is not None:
        text += f" (of {res['collected']} selected)"
    if res.get("collect_errors"):
        text += f"; {len(res['collect_errors'])} collection error(s)"
    if res.get("running"):
        text += f"; running when stopped: {', '.join(res['running'][:4])}"
    configs = ("the first only (CURVRATE_TRITON_AUTOTUNE=0)" if res.get("autotune", "1") == "0"
               else "all (autotuned)")
    md = [f"pytest {' '.join(res.get('args', []))}", "",
          f"**{text}**; exit status {res.get('exitstatus', '–')}; configs per kernel variant: {configs}; "
          f"full log: `{FILES['pytest']}`."]
    if res.get("failures"):
        md += [""] + _md_head("failed test", "message (end)")
        for nid, msg in list(res["failures"].items())[:30]:
            last = [ln for ln in msg.strip().splitlines() if ln.strip()][-3:]
            md.append(_md_row(f"`{nid}`", " / ".join(last).replace("|", "/")[:400]))
    if res.get("collect_errors"):
        md += ["", "Collection errors: " + "; ".join(f"`{e['node']}`" for e in res["collect_errors"])]
    if res.get("slowest"):
        md += ["", "Slowest: " + ", ".join(f"`{k}` {v} s" for k, v in res["slowest"][:5])]
    return {"text": text, "md": "\n".join(md), "counts": c}


def _sum_kernels(res: dict, smoke: bool) -> dict:
    r = res.get("results") or {}
    if not r:
        return {"text": "no case ran", "md": "", "parts": {}}
    copy = (r.get("copy") or [{}])[0]
    parts = {}
    for part in ("activation", "linear", "cross_entropy"):
        rows = r.get(part, [])
        checked = [x for x in rows if x.get("ok") is not None]
        parts[part] = {"rows": len(rows), "checked": len(checked),
                       "check_failed": sum(1 for x in checked if x.get("ok") is False),
                       "errors": sum(1 for x in rows if "error" in x),
                       "skipped": sum(1 for x in rows if "skipped" in x)}
    text = f"copy {_fmt(copy.get('GB/s'), '{:.4g}')} GB/s; " + "; ".join(
        f"{p}: {v['checked'] - v['check_failed']}/{v['checked']} checks ok"
        + (f", {v['errors']} errors" if v["errors"] else "") + (f", {v['skipped']} skipped" if v["skipped"] else "")
        for p, v in parts.items())
    md = [f"Copy bandwidth (torch.clone, read + write): {_fmt(copy.get('GB/s'), '{:.4g}')} GB/s. "
          f"Full tables: `{FILES['kernels']}`.", ""]
    act = [x for x in r.get("activation", []) if "ms" in x]
    if act:
        md += ["Activation jets (K = 4): forward / backward kernel as a fraction of the copy bandwidth, "
               "speedup over the reference chain:", ""]
        md += _md_head("kind", "dtype", "stored", "N", "fwd of copy", "bwd of copy", "speedup", "bwd speedup", "ok")
        for x in act:
            md.append(_md_row(x["kind"], x["dtype"], x["stored"], x["N"], _pct(x.get("of_copy")),
                              _pct(x.get("backward_of_copy")), _x(x.get("speedup_vs_reference")),
                              _x(x.get("backward_speedup")), x.get("ok")))
        md.append("")
    lin = [x for x in r.get("linear", []) if "ms" in x and x.get("kind") and "impl=" in x.get("variant", "")]
    if lin:
        md += ["Linear jet φ(x Wᵀ + b), input jet (2 rows): ms of each path:", ""]
        md += _md_head("in", "out", "B", "dtype", "kind", "cublas ms", "fused ms", "auto ms", "ok")
        groups: Dict[tuple, dict] = {}
        for x in lin:
            key = (x["in"], x["out"], x["B"], x["dtype"], x["kind"])
            g = groups.setdefault(key, {"ok": True})
            for impl in ("cublas", "fused", "auto"):
                if f"impl={impl}" in x["variant"]:
                    g[impl] = x["ms"]
            g["ok"] = g["ok"] and x.get("ok", True) is not False
        for key, g in groups.items():
            md.append(_md_row(*key, g.get("cublas"), g.get("fused"), g.get("auto"), g["ok"]))
        md.append("")
    choices = res.get("linear_impl_choices") or []
    if choices:
        md.append("`linear_impl=\"auto\"` chose: " + "; ".join(
            f"{c['in']}→{c['out']} {c['dtype'].replace('torch.', '')} {c['kind']} rows 2^{c['rows_log2']}: "
            f"**{c['choice']}**" for c in choices[:12]))
        md.append("")
    ce = [x for x in r.get("cross_entropy", []) if "ms" in x]
    if ce:
        md += ["Cross-entropy jet:", ""]
        md += _md_head("B", "C", "dtype", "stored", "fwd of copy", "bwd of copy", "speedup", "ok")
        for x in ce:
            md.append(_md_row(x["B"], x["C"], x["dtype"], x["stored"], _pct(x.get("of_copy")),
                              _pct(x.get("backward_of_copy")), _x(x.get("speedup_vs_reference")), x.get("ok")))
        md.append("")
    bad = [x for p in ("activation", "linear", "cross_entropy") for x in r.get(p, [])
           if x.get("ok") is False or "error" in x]
    if bad:
        md += ["Failed cases:", ""]
        for x in bad[:20]:
            md.append("- " + json.dumps({k: v for k, v in x.items() if not k.endswith("ms")}, default=str)[:400])
    tuned = res.get("autotune") or {}
    if tuned:
        md += ["", "Autotuner picks: " + "; ".join(f"{k}: {len(v)} key(s)" for k, v in tuned.items())
               + f" (in `{FILES['json']}`)."]
    return {"text": text, "md": "\n".join(md), "parts": parts}


def _sum_workloads(res: dict, smoke: bool) -> dict:
    rows = res.get("rows") or []
    deriv = [r for r in rows if r.get("kind") == "deriv"]
    crr = [r for r in rows if r.get("kind") == "crr"]
    checks = [r for r in rows if r.get("kind") == "check"]
    bits = []
    md = [f"Full tables: `{FILES['workloads']}`.", ""]
    if checks:
        bad = [f"{r['workload']}/{r['method']}" for r in checks if not r.get("ok")]
        bits.append(f"float64 checks {len(checks) - len(bad)}/{len(checks)} ok")
        md.append("Correctness (float64 vs nested autograd): " + (
            "all within 1e-8." if not bad else f"**MISMATCH** {', '.join(bad)}."))
        md.append("")
    if deriv:
        md += ["Derivative step (orders 1–4 per sample + backward of mean|d|, 1 direction, float32):", ""]
        md += _md_head("workload", "method", "median ms", "vs nested autograd", "ours vs compiled reference",
                       "note")
        for r in deriv:
            note = r.get("error", "")
            if r.get("compile_s") is not None:
                note = f"compile+1st call {r['compile_s']:.1f} s"
            md.append(_md_row(r["workload"], r["method"], r.get("median_ms"), _x(r.get("speedup")),
                              _x(r.get("speedup_vs_compile")), str(note).replace("|", "/")[:160]))
            if r.get("method") == "ours" and r.get("speedup") is not None:
                s = f"{r['workload']} ours {r['speedup']:.1f}× vs nested autograd"
                if r.get("speedup_vs_compile") is not None:
                    s += f", {r['speedup_vs_compile']:.2f}× vs compiled"
                bits.append(s)
        md.append("")
        if not smoke:
            md.append(f"Targets: ≥ {TARGET_VS_BASELINE:g}× vs nested autograd, ≥ {TARGET_VS_COMPILE:g}× "
                      "vs the compiled reference rules.")
            md.append("")
    if crr:
        md += ["CRR training step (forward, loss, penalty, backward, Adam) against a plain step:", ""]
        md += _md_head("setting", "step", "median ms", "overhead vs plain", "speedup vs nested-autograd CRR",
                       "note")
        for r in crr:
            md.append(_md_row(r["workload"], r["method"], r.get("median_ms"), _x(r.get("overhead_x")),
                              _x(r.get("speedup")) if r["method"] != "plain" else "",
                              str(r.get("error", "")).replace("|", "/")[:160]))
            if r.get("method") == "ours_crrloss" and r.get("overhead_x") is not None:
                bits.append(f"{r['workload']} CRRLoss {r['overhead_x']:.2f}× plain")
        md.append("")
    items = res.get("items", [])
    skipped = [i["item"] for i in items if i.get("status") == "skipped"]
    errors = [i["item"] for i in items if i.get("status") == "error"]
    if skipped:
        bits.append(f"skipped (time box): {', '.join(skipped)}")
        md.append(f"Skipped (time box): {', '.join(skipped)}.")
    if errors:
        bits.append(f"errors: {', '.join(errors)}")
        md.append(f"Errors in: {', '.join(errors)} (tracebacks in `{FILES['json']}` and `{FILES['console']}`).")
    return {"text": "; ".join(bits) or "no rows", "md": "\n".join(md)}


SUMMARIES: Dict[str, Callable[[dict, bool], dict]] = {
    "env": _sum_env, "pytest": _sum_pytest, "kernels": _sum_kernels, "workloads": _sum_workloads}


def summary_table(doc: dict) -> str:
    lines = [f"{'section':10s} {'status':12s} {'s':>6s}  summary"]
    for name in SECTION_NAMES:
        rec = doc["sections"][name]
        text = (rec.get("summary") or {}).get("text", "")
        lines.append(f"{name:10s} {rec['status']:12s} {_fmt(rec.get('wall_s'), '{:.0f}'):>6s}  {text[:200]}")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    m = doc["meta"]
    title = f"# GPU check — {m.get('device') or 'device not read yet'}"
    if m["smoke"]:
        title += f" — {SMOKE_LABEL}"
    out = [title, ""]
    dirty = {True: " (with uncommitted changes)", False: "", None: ""}[m.get("dirty")]
    out.append(f"torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, python {m.get('python')}; "
               f"commit `{m['commit']}`{dirty} ({m['commit_source']}); {m['date']}; budget {m['budget_s']:.0f} s, "
               f"ran {m['wall_s']:.0f} s.")
    if m.get("note"):
        out += ["", m["note"]]
    out += ["", "| section | status | s (allotted) | summary |", "|---|---|---|---|"]
    for name in SECTION_NAMES:
        rec = doc["sections"][name]
        s = f"{_fmt(rec.get('wall_s'), '{:.0f}')} ({_fmt(rec.get('allotted_s'), '{:.0f}')})"
        text = (rec.get("summary") or {}).get("text", "")
        out.append(f"| {name} | {rec['status']} | {s} | {text.replace('|', '/')[:300]} |")
    for i, (name, title, _) in enumerate(SECTIONS, 1):
        rec = doc["sections"][name]
        out += ["", f"## {i}. {title} — {rec['status']}", ""]
        if rec.get("error"):
            out += ["```", _tail(rec["error"], 2500), "```", ""]
        md = (rec.get("summary") or {}).get("md")
        if md:
            out.append(md)
        item_errors = [i for i in (rec.get("result") or {}).get("items", []) if i.get("status") == "error"]
        for it in item_errors[:6]:
            out += ["", f"Error in `{it['item']}`:", "```", _tail(it.get("error", ""), 1200), "```"]
    out += ["", "Status: ok = ran and passed; failed = ran, some check or test failed; error = raised; "
                "timeout = killed at its time box (what it finished is kept); skipped / not selected = not run.",
            ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
