"""The kernel half of the GPU check (#13): the CUDA tests of the Triton kernels, then bench/kernels.py, one table.

One command on a CUDA machine, from the project root (on the offline GPU machine, after
`source bench/gpu_env.sh`, which installs the carried wheels; see BENCHMARKS.md):

    python3 bench/gpu_kernels.py --out "$OUT"

1. `pytest -m cuda` over the kernel tests (tests/test_kernels_*.py: every kernel against its torch
   reference on CUDA, and the backends' parity and load-time checks of a served model);
2. bench/kernels.py: each kernel checked, then timed against its reference with do_bench, with the
   view kernel's achieved GB/s against the GPU's memory bandwidth;
3. one summary table with the GPU's name, written to OUT/summary.txt beside the raw files
   (cuda-tests.xml / .log, kernels.json / .log).

Exit status 0 only when every CUDA test passed and the benchmark ran (speed targets missed are
reported, not failed). bench/gpu_check.py (#14) runs this first, then the service-level checks:
`source bench/gpu_env.sh && python3 bench/gpu_check.py --out "$OUT"` is the whole GPU check.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py"))


def run(cmd: list[str], log: Path, timeout_s: float) -> int:
    """Run `cmd` from the project root, output to `log` (and echoed); the exit status, 124 on timeout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout_s)
            status, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            status, output = 124, (exc.stdout or b"").decode(errors="replace")  # bytes, whatever `text` says
        f.write(output)
    print(output[-4000:], flush=True)
    return status


def test_counts(xml: Path) -> dict[str, dict[str, int]]:
    """Per test file: passed / failed / skipped, from pytest's JUnit XML."""
    counts: dict[str, dict[str, int]] = {}
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("classname", "?").rsplit(".", 1)[-1] + ".py"
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        counts.setdefault(name, dict(passed=0, failed=0, skipped=0))[outcome] += 1
    return counts


def _bench_module():
    """bench/kernels.py as a module, by path (a top-level `kernels` package may exist where this runs)."""
    spec = importlib.util.spec_from_file_location("kernel_bench", ROOT / "bench" / "kernels.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def summary(counts: dict[str, dict[str, int]], test_status: int, bench: dict | None, bench_status: int) -> str:
    lines = [f"CUDA kernel tests (pytest -m cuda, exit {test_status}):"]
    lines += [f"  {name:34} {c['passed']:3} passed {c['failed']:3} failed {c['skipped']:3} skipped"
              for name, c in sorted(counts.items())]
    if bench is None:
        lines.append(f"bench/kernels.py did not finish (exit {bench_status}); see kernels.log")
    else:
        lines += ["bench/kernels.py (do_bench medians; each kernel checked against torch first):",
                  _bench_module().table(bench["device"], bench["rows"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-kernels"), help="folder for the results")
    parser.add_argument("--tests-timeout", type=float, default=420.0, help="seconds for the CUDA tests")
    parser.add_argument("--bench-timeout", type=float, default=240.0, help="seconds for bench/kernels.py")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xml = out / "cuda-tests.xml"
    test_status = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rfE",
                       f"--junitxml={xml}", *TESTS], out / "cuda-tests.log", args.tests_timeout)
    bench_json = out / "kernels.json"
    bench_json.unlink(missing_ok=True)
    bench_status = run([sys.executable, "bench/kernels.py", "--json", str(bench_json)], out / "kernels.log",
                       args.bench_timeout)
    bench = json.loads(bench_json.read_text()) if bench_status == 0 and bench_json.exists() else None
    text = summary(test_counts(xml), test_status, bench, bench_status)
    (out / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    return 0 if test_status == 0 and bench is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
