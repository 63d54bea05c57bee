"""Every ```python block of README.md and docs/*.md (not docs/history.md, a frozen record) runs on the CPU, so an
example that a new user copies and that no longer works fails here: one test per block, id ``file:line`` (the
line of its opening fence).

The blocks of one file run in order in one namespace (a block may use the names of the blocks above it), in a
child process per file: examples patch modules, install import hooks and start a process group, and none of that
may reach the other tests. The child seeds torch with the test's seed; a traceback's line numbers are the
markdown file's. Nothing is shrunk or rewritten here: an example runs exactly as shown.

Markers, an HTML comment (invisible on the rendered page) on the line just before a ```python fence:

* ``<!-- example: skip (why) -->``: the block cannot run on the CPU (CUDA, several processes, a package the
  tests do not install); it is compiled (syntax) but not run, and ``why`` is the test's skip reason;
* ``<!-- example: setup`` then code lines then ``-->`` (the ``-->`` alone on the line before the fence): hidden
  code, run in the file's namespace just before the block (inputs a fragment leaves to the reader).

Any other ``<!-- example:`` comment, or one not followed by a fence, fails ``test_markers``; an unmarked block
must run.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "history.md")]
TIMEOUT_S = 300  # per file; the whole test takes ~6 s on 2 idle cores

# under pytest-xdist's --dist loadgroup (bench/gpu.sh) one worker runs them all: one child per file, not per worker
pytestmark = pytest.mark.xdist_group("docs_examples")

_FENCE = re.compile(r"^(\s*)```python\s*$")
_SKIP = re.compile(r"^\s*<!-- example: skip \((.+)\) -->\s*$")
_SETUP = re.compile(r"^\s*<!-- example: setup\s*$")


class Example(NamedTuple):
    file: str            # path relative to the checkout
    line: int            # 1-based line of the opening fence
    code: str
    setup: str           # hidden setup code, "" for none
    setup_line: int      # 1-based line of the setup's first code line
    skip: Optional[str]  # the reason, or None: the block runs


def parse(text: str, rel: str) -> tuple[list[Example], list[str]]:
    """The ```python blocks of the markdown ``text`` of file ``rel`` with their markers, and the marker errors
    (``file:line: what``)."""
    lines = text.splitlines()
    examples, errors = [], []
    skip, setup, setup_line, marker_at = None, "", 0, None  # the pending marker
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if marker_at is not None and not fence:
            errors.append(f"{rel}:{marker_at}: an example marker must be on the line just before a ```python fence")
            skip, setup, marker_at = None, "", None
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), None)
            if end is None:
                errors.append(f"{rel}:{i + 1}: ```python fence never closed")
                break
            indent = len(fence.group(1))
            code = textwrap.dedent("\n".join(ln[indent:] if ln[:indent].isspace() else ln for ln in lines[i + 1:end]))
            examples.append(Example(rel, i + 1, code, setup, setup_line, skip))
            skip, setup, marker_at = None, "", None
            i = end + 1
            continue
        if line.strip().startswith("<!-- example:"):
            marker_at = i + 1
            if _SKIP.match(line):
                skip = _SKIP.match(line).group(1).strip()
            elif _SETUP.match(line):
                end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
                if end is None:
                    errors.append(f"{rel}:{i + 1}: example setup comment never closed by a '-->' line")
                    break
                setup, setup_line = textwrap.dedent("\n".join(lines[i + 1:end])), i + 2
                i = end
            else:
                errors.append(f"{rel}:{i + 1}: unknown example marker {line.strip()!r}; expected "
                              f"'<!-- example: skip (why) -->' or '<!-- example: setup' ... '-->'")
                marker_at = None
        i += 1
    if marker_at is not None:
        errors.append(f"{rel}:{marker_at}: an example marker must be on the line just before a ```python fence")
    return examples, errors


_PARSED = [parse(p.read_text(), p.relative_to(ROOT).as_posix()) for p in FILES]
EXAMPLES = [ex for exs, _ in _PARSED for ex in exs]
MARKER_ERRORS = [err for _, errs in _PARSED for err in errs]

# The child: runs one file's blocks in order in one namespace, stops at the first failure, writes a JSON list of
# {"line", "ok", "error"} to argv[1]. Code is padded with newlines so that tracebacks give the markdown's lines.
_CHILD = r"""
import json, sys, traceback
import torch
spec = json.load(sys.stdin)
torch.manual_seed(spec["seed"])
ns, results = {"__name__": "__main__"}, []
for ex in spec["examples"]:
    try:
        if ex["setup"]:
            exec(compile("\n" * (ex["setup_line"] - 1) + ex["setup"], spec["path"], "exec"), ns)
        exec(compile("\n" * ex["line"] + ex["code"], spec["path"], "exec"), ns)
        results.append({"line": ex["line"], "ok": True, "error": ""})
    except BaseException:
        results.append({"line": ex["line"], "ok": False, "error": traceback.format_exc()})
        break
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""

_RUNS: dict[str, dict] = {}  # file -> {fence line: result}, one child per file per session


def run_examples(rel: str, examples: list[Example], seed: int, tmp: Path) -> dict:
    """Runs ``examples`` (the runnable blocks of file ``rel``, in order) in one child process: ``{fence line:
    {"ok", "error"}}`` up to the first failure, ``"seed"``, and ``"crash"`` if the child gave no results."""
    out = tmp / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    spec = json.dumps({"seed": seed, "path": str(ROOT / rel), "examples": [ex._asdict() for ex in examples]})
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(out)], input=spec, text=True, cwd=ROOT,
                              env=env, capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"seed": seed, "crash": f"the examples of {rel} ran past {TIMEOUT_S} s (seed {seed})"}
    if not out.exists():
        return {"seed": seed, "crash": f"the child running {rel}'s examples exited {proc.returncode} without "
                                       f"results (seed {seed}):\n{proc.stderr[-4000:]}"}
    return {"seed": seed, **{r["line"]: r for r in json.loads(out.read_text())}}


def _run_file(rel: str, seed: int, tmp: Path) -> dict:
    if rel not in _RUNS:
        _RUNS[rel] = run_examples(rel, [ex for ex in EXAMPLES if ex.file == rel and ex.skip is None], seed, tmp)
    return _RUNS[rel]


def test_markers():
    """Every example marker is well formed and sits on the line before a fence; the extraction finds the
    README's examples (so that a broken parser cannot pass by finding none)."""
    assert not MARKER_ERRORS, "\n".join(MARKER_ERRORS)
    assert sum(ex.file == "README.md" and ex.skip is None for ex in EXAMPLES) >= 5


def test_parse_and_run_a_synthetic_page(tmp_path):
    """The harness itself: markers attach to the next fence, malformed ones are reported with their line, a
    failing block fails with its markdown line in the traceback and stops the file's later blocks."""
    page = textwrap.dedent("""\
        # page
        ```python
        x = 2
        ```
        <!-- example: setup
        y = x + 1
        -->
        ```python
        assert y == 3
        z = 1 / (y - 3)
        ```
        <!-- example: skip (needs CUDA) -->
        ```python
        torch.ones(1, device="cuda")
        ```
        ```python
        w = z
        ```
        <!-- example: skip (a reason) -->

        <!-- example: skip -->
        ```python
        ```
        """)
    examples, errors = parse(page, "page.md")
    assert [(ex.line, ex.skip, bool(ex.setup)) for ex in examples] == [
        (2, None, False), (8, None, True), (13, "needs CUDA", False), (16, None, False), (22, None, False)]
    assert examples[1].setup == "y = x + 1" and examples[1].setup_line == 6
    assert [e.split(": ")[0] for e in errors] == ["page.md:19", "page.md:21"]
    assert "just before a ```python fence" in errors[0] and "unknown example marker" in errors[1]
    run = run_examples("page.md", [ex for ex in examples[:4] if ex.skip is None], 0, tmp_path)
    assert run[2]["ok"] and not run[8]["ok"] and 16 not in run
    assert "ZeroDivisionError" in run[8]["error"] and "line 10" in run[8]["error"], run[8]["error"]


@pytest.mark.parametrize("ex", EXAMPLES, ids=[f"{ex.file}:{ex.line}" for ex in EXAMPLES])
def test_example(ex: Example, _seed, tmp_path):
    if ex.skip is not None:
        compile("\n" * ex.line + ex.code, ex.file, "exec")  # shown to users: at least valid Python
        pytest.skip(f"{ex.file}:{ex.line}: {ex.skip}")
    run = _run_file(ex.file, _seed, tmp_path)
    if "crash" in run:
        pytest.fail(run["crash"], pytrace=False)
    result = run.get(ex.line)
    if result is None:
        failed = next(line for line, r in run.items() if line != "seed" and not r["ok"])
        pytest.fail(f"not run: the example at {ex.file}:{failed} above it failed first", pytrace=False)
    if not result["ok"]:
        pytest.fail(f"the example at {ex.file}:{ex.line} raised (seed {run['seed']}):\n{result['error']}",
                    pytrace=False)
