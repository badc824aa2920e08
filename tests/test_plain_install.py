"""`pip install peftlab` alone runs the main job: the wheel in a fresh virtual environment
(torch 2.13.0 first, as the README says) trains and reports a tiny comparison."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_alone_runs_a_comparison_end_to_end(tmp_path, text_file):
    def run(*cmd, **kw):
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200, **kw)
        assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"
        return done

    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("peftlab-*.whl"))
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    pip = [tmp_path / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(*pip, "torch==2.13.0")
    run(*pip, wheel)
    out = tmp_path / "cmp"
    done = run(tmp_path / "venv" / "bin" / "peftlab", "compare", "-m", "tiny-llama", "-d", text_file, "-s", "full",
               "-s", "lora:r=2@1e-2", "--steps", 2, "--seq-len", 32, "--batch-size", 2, "--samples", 1, "--gen-tokens", 4,
               "--forget", "none", "--quiet", "-o", out, cwd=tmp_path)
    assert (out / "report.html").stat().st_size > 10_000 and (out / "results.json").exists()
    assert "report:" in done.stdout
