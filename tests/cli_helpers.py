"""What the command-line tests share: the smallest run's flags and the CLI run in this process.

A module of its own, not ``conftest.py``: test modules import it by name, and ``conftest`` would
resolve to whichever of the suite's conftest files was imported first.
"""

from elbolab.cli import main

# The smallest run of the command line: a 64-16-2 VAE on digits for two epochs (about a second).
TINY = ["--data", "digits", "--binarize", "dynamic", "--hidden", "16", "--z-dim", "2", "--epochs", "2", "--quiet"]


def exit_status_and_stderr(argv: list[str], capsys) -> tuple[int, str]:
    """``elbolab ARGV`` in this process: its exit status and standard error (a subprocess costs seconds of imports)."""
    try:
        status = main(argv)
    except SystemExit as done:  # argparse's refusals and --help
        status = done.code
    return status, capsys.readouterr().err
