"""The example analysis scripts run end to end (shortened), and say what they found."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *argv: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *argv], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compare_guides_by_khat(tmp_path):
    out = run("compare_guides_by_khat.py", "--epochs", "15", "--num-samples", "300", "--out", str(tmp_path), cwd=tmp_path)
    assert re.search(r"gaussian\s+-\d+\.\d+", out) and re.search(r"iaf x4\s+-\d+\.\d+", out)
    assert (tmp_path / "khat_by_guide.png").stat().st_size > 10_000


def test_refine_worst_points_shrinks_their_gap(tmp_path):
    out = run("refine_worst_points.py", "--epochs", "15", "--worst", "4", "--steps", "200", "--num-samples", "500",
              cwd=tmp_path)
    gap_before, gap_after = map(float, re.search(r"gap (\S+) -> (\S+) nats", out).groups())
    assert gap_after < gap_before, out
