"""Where runs read and write: local paths, and object-storage URLs (`gs://bucket/...`).

`path(p)` is the one way a path from the config or the command line becomes a path object:
  * a local path stays a `pathlib.Path`, `~` expanded and made absolute (as it always was);
  * a URL becomes an `etils.epath.Path`, which has the same interface (`/`, `read_text`,
    `write_text`, `exists`, `is_file`, `iterdir`, `mkdir`, `rename`, `unlink`, ...).
Orbax and TensorStore take either kind and write checkpoints to Cloud Storage themselves.

Which client talks to Cloud Storage:
  * files written through `etils.epath` (config.json, summary.json, dataset.json, predictions,
    plots, Orbax's own metadata, data read from `data.path`): fsspec's `gcsfs`. epath picks
    TensorFlow's `tf.io.gfile` instead when TensorFlow is installed unless `EPATH_USE_TF` is
    false; this module sets that default (an explicit `EPATH_USE_TF` wins), because gcsfs, unlike
    TensorFlow's client, can be pointed at an emulator (`STORAGE_EMULATOR_HOST`), so what runs
    in the cloud is what the tests run;
  * checkpoint arrays: TensorStore's `gcs` driver (through Orbax);
  * TensorBoard event files: TensorFlow writes them into a local folder and `TensorBoardWriter`
    copies them into the workdir through epath at every flush (the training loop flushes at each
    checkpoint and at the end); TensorFlow's own Cloud Storage client has no endpoint setting,
    so writing them there directly could not be tested;
  * `data.tfds_data_dir`: TensorFlow Datasets (tf.data reads the records with TensorFlow's client).
Credentials are the machine's (Application Default Credentials) for all of them.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import tempfile
import time

# Before any epath path picks its backend (epath caches the choice on first use).
os.environ.setdefault("EPATH_USE_TF", "false")

from clu import metric_writers  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position

# gcsfs keeps folder listings and by default never expires them; checkpoints are written by
# TensorStore and by the other hosts of a job, which that cache does not see.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

URL_SCHEMES = ("gs://",)

Path = pathlib.Path | epath.Path


def is_url(p: str | os.PathLike) -> bool:
  """Whether `p` names object storage (`gs://...`) rather than a local file."""
  return os.fspath(p).startswith(URL_SCHEMES)


def path(p: str | os.PathLike, absolute: bool = True) -> Path:
  """`p` as a path object: a local `pathlib.Path` (`~` expanded; made absolute unless
  `absolute=False`), or an epath URL."""
  if is_url(p):
    return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))
  local = pathlib.Path(p).expanduser()
  return local.absolute() if absolute else local


def files_under(root: Path) -> list[Path]:
  """Every file below the folder `root`, recursively (unsorted).

  For a URL: one listing request per page of objects, not one per folder and file (epath refuses
  a recursive `rglob` on gs://, and its `walk` drops the scheme from the folders it yields).
  """
  if not is_url(root):
    return [p for p in root.rglob("*") if p.is_file()]
  fs, fs_path = fsspec.core.url_to_fs(os.fspath(root))
  scheme = os.fspath(root).split("://", 1)[0]
  return [epath.Path(f"{scheme}://{name}") for name in fs.find(fs_path)]


class TensorBoardWriter(metric_writers.MetricWriter):
  """TensorBoard event files for a local folder or a URL.

  Scalars are written as TensorBoard scalar values (`Summary.Value.simple_value`), so that
  TensorBoard's `EventAccumulator(...).Scalars(tag)` and other readers of the event format see
  them as scalars (clu's writer stores them as tensor events); the other kinds go through clu's
  `SummaryWriter`, created on first use, into a second event file of the same folder.

  For a URL the events go to a local folder first and are copied to `logdir` at every `flush`
  and on `close` (an event file is appended to; an object is written whole, as TensorFlow's own
  client does at each flush).
  """

  def __init__(self, logdir: str | os.PathLike):
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top

    self._target = path(logdir) if is_url(logdir) else None
    self._local = (
        tempfile.mkdtemp(prefix="pirl_jax_events_")
        if self._target is not None
        else os.fspath(logdir)
    )
    os.makedirs(self._local, exist_ok=True)
    self._scalars = event_file_writer.EventFileWriter(self._local)
    self._clu_writer = None

  @property
  def _writer(self):
    if self._clu_writer is None:
      self._clu_writer = metric_writers.SummaryWriter(self._local)
    return self._clu_writer

  def write_scalars(self, step, scalars):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top

    values = [
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in scalars.items()
    ]
    self._scalars.add_event(
        event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
    )

  def write_summaries(self, step, values, metadata=None):
    self._writer.write_summaries(step, values, metadata)

  def write_images(self, step, images):
    self._writer.write_images(step, images)

  def write_videos(self, step, videos):
    self._writer.write_videos(step, videos)

  def write_audios(self, step, audios, *, sample_rate):
    self._writer.write_audios(step, audios, sample_rate=sample_rate)

  def write_texts(self, step, texts):
    self._writer.write_texts(step, texts)

  def write_histograms(self, step, arrays, num_buckets=None):
    self._writer.write_histograms(step, arrays, num_buckets)

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    self._writer.write_pointcloud(step, point_clouds, point_colors=point_colors, configs=configs)

  def write_hparams(self, hparams):
    self._writer.write_hparams(hparams)

  def flush(self):
    self._scalars.flush()
    if self._clu_writer is not None:
      self._clu_writer.flush()
    if self._target is not None:
      self._target.mkdir(parents=True, exist_ok=True)
      for name in sorted(os.listdir(self._local)):
        with open(os.path.join(self._local, name), "rb") as f:
          (self._target / name).write_bytes(f.read())

  def close(self):
    self.flush()
    self._scalars.close()
    if self._clu_writer is not None:
      self._clu_writer.close()
    if self._target is not None:
      shutil.rmtree(self._local, ignore_errors=True)


def save_figure(fig, p: str | os.PathLike, **kwargs) -> None:
  """`fig.savefig(p)` for a local path or a URL (the format from the name's suffix)."""
  if not is_url(p):
    fig.savefig(p, **kwargs)
    return
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(os.fspath(p))[1][1:] or "png", **kwargs)
  path(p).write_bytes(buffer.getvalue())
