"""The README's quick start: two commands, and CI runs the second one verbatim."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands():
  readme = (REPO / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
  run_main, run_tests = _quick_start_commands()
  assert run_main.endswith("main.py --config=configs/pirl.py")
  assert "pytest" in run_tests
  ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
  assert run_tests in ci_lines
