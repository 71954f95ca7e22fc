"""The benchmark scripts a GPU session runs keep working: each runs end to end with tiny sizes."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_goals_runs_and_reports_each_figure(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_goals.py"), "--device", "cpu", "--points", "300", "--test-points", "20",
         "--num-samples", "30", "--epochs", "2", "--batch-sizes", "64,150", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "data: random binary images" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "fit, batch    64", "fit, batch   150", "log_likelihood, 30 samples x 20 images, fixed CPU-sized chunks",
    ]
