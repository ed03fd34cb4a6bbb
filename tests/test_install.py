"""A non-editable install works outside the checkout: the wheel carries the recipes and the
DeepSpeed configs, every CLI has a console command, and a 2-step run trains from an empty
folder (runs and phantom shards land in the working directory)."""

import os
import subprocess
import sys

from tests.conftest import REPO
from tests.pretrain_runs import free_port


def _run(cmd, cwd, **env):
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=540,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env),
    )


def test_the_wheel_installs_and_trains_from_an_empty_folder(tmp_path):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    # torch, DeepSpeed and the rest come from this machine; prior_dist only from the wheel.
    assert (
        _run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path
        ).returncode
        == 0
    )
    (wheel,) = wheels.glob("prior_dist-*.whl")
    install = _run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    where = _run(
        [str(venv / "bin/python"), "-c", "import prior_dist; print(prior_dist.__file__)"], work
    )
    assert where.stdout.startswith(str(venv)), where.stdout
    for command in ("shardify", "pretrain", "evaluate", "export", "visualize", "stream", "info"):
        helped = _run([str(venv / "bin" / f"prior-{command}"), "--help"], work)
        assert helped.returncode == 0 and "usage" in helped.stdout, (command, helped.stderr[-500:])
    shown = _run([str(venv / "bin/prior-pretrain"), "--recipe", "demo", "--print-config"], work)
    assert shown.returncode == 0 and "name: demo" in shown.stdout, shown.stderr[-2000:]
    trained = _run(
        [
            str(venv / "bin/prior-pretrain"),
            "--recipe",
            "tiny",
            "--config",
            "zero2",
            "--max-steps",
            "2",
            "--set",
            "logging.progress=false",
        ],
        work,
        MASTER_PORT=str(free_port()),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done at step 2" in trained.stdout
    assert (work / "runs/tiny/checkpoints/step00000002/complete.json").is_file()
    assert (work / "shards/tiny/manifest.json").is_file()
