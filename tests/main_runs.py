"""`python main.py` in a subprocess, for the tests that need a real process (signals, kills,
several processes): its environment, its output as it runs, and what it leaves in a workdir."""

import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import helpers  # tests/helpers.py

REPO = pathlib.Path(__file__).resolve().parents[1]
steps = helpers.steps
item = helpers.item


def env(cache_root, devices=None, compilation_cache=None) -> dict:
  """The user's environment: CPU, one device unless `devices`; data cache under `cache_root`."""
  result = dict(os.environ)
  result.pop("XLA_FLAGS", None)
  if devices:
    result["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  result["JAX_PLATFORMS"] = "cpu"
  result["PIRL_JAX_CACHE"] = str(cache_root)
  if compilation_cache:
    # Repeated runs of one program load it instead of compiling it again: same executable.
    result["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
    result["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    result["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return result


class Run:
  """main.py in a subprocess; its stdout and stderr (absl logs) are collected as it runs."""

  def __init__(self, args, env_vars):
    self.proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env_vars,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.started = time.time()
    self.lines, self.stdout = [], []
    self._readers = [threading.Thread(target=self._read, args=(pipe, out), daemon=True)
                     for pipe, out in ((self.proc.stderr, self.lines),
                                       (self.proc.stdout, self.stdout))]
    for reader in self._readers:
      reader.start()

  @staticmethod
  def _read(pipe, out):
    for line in pipe:
      out.append(line)

  def logged_step(self) -> int:
    """The last step of a progress line ('step 12/30 ...'), 0 before the first."""
    found = [int(m.group(1)) for line in list(self.lines)
             if (m := re.search(r"(?:^|\s)step (\d+)/\d+ \(", line))]
    return max(found, default=0)

  def wait_until(self, condition, timeout=300, what=""):
    deadline = time.time() + timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f"main.py exited ({self.proc.returncode}) before {what}:\n"
                             + "".join(self.lines[-40:]))
      if time.time() > deadline:
        self.proc.kill()
        raise AssertionError(f"Timed out waiting for {what}:\n" + "".join(self.lines[-40:]))
      time.sleep(0.02)

  def finish(self, timeout=300):
    """Waits for the exit; returns (exit code, stdout, stderr)."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise
    for reader in self._readers:
      reader.join(timeout=30)
    return self.proc.returncode, "".join(self.stdout), "".join(self.lines)
