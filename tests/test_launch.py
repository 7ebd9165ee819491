"""The launchers' own logic, with a fake trainer standing in for `python -m jaxdistill.train` (no JAX, a few
seconds): launch/local.sh's exit statuses, stopping and log tail, and launch/tpu_vm.sh's run/stop with a fake
gcloud that runs the worker command here. A real two-process run through local.sh is in test_sharding.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parents[1] / "launch"
# `$PYTHON -m jaxdistill.train ARGS` (or .prepare) → this script. Process 1 fails at once under FAKE=fail1;
# otherwise each process runs until SIGTERM, then "checkpoints" (process 0 for 2 s) and exits 0. FAKE=quick:
# one step, exit 0.
FAKE_TRAINER = """#!/usr/bin/env bash
trap 'echo "got TERM"; kill $sleeper; sleep $(( ${JAX_PROCESS_ID:-0} == 0 ? 2 : 0 )); echo checkpointed; exit 0' TERM
case "$1 $2" in "-m jaxdistill.train" | "-m jaxdistill.prepare") ;; *) echo "not python -m: $*"; exit 9 ;; esac
shift 2
echo "process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS started: $*"
case "${FAKE:-}" in
  quick) echo "step 1 loss 0.5"; exit 0 ;;
  fail1) if [[ $JAX_PROCESS_ID == 1 ]]; then sleep 0.5; echo "crash"; exit 3; fi ;;
esac
sleep 30 & sleeper=$!
wait $sleeper
exit 1
"""


@pytest.fixture
def trainer(tmp_path):
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_TRAINER)
    path.chmod(0o755)
    return path


# Runs a command with SIGINT at its default, as from a terminal: a suite run from a background shell inherits it
# ignored, and bash cannot trap a signal ignored on entry (a preexec_fn would fork the multithreaded JAX process).
AS_FROM_A_TERMINAL = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execvp(sys.argv[1], sys.argv[1:])"]


def _local(trainer, n, workdir, fake, **popen):
    env = os.environ | {"PYTHON": str(trainer), "FAKE": fake}
    return subprocess.Popen([*AS_FROM_A_TERMINAL, "bash", str(LAUNCH / "local.sh"), str(n), "--config", "c.py",
                             "--workdir", str(workdir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _log(workdir, p):
    return (Path(workdir) / f"process_{p}.log").read_text()


def test_a_failing_process_stops_the_others_and_its_status_is_the_launchers(trainer, tmp_path):
    start = time.monotonic()
    launcher = _local(trainer, 2, tmp_path / "run", "fail1")
    out, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 3, err
    assert time.monotonic() - start < 15  # process 0 was stopped, not left to run its 30 s
    assert "process 1 exited with status 3" in err
    assert "got TERM" in _log(tmp_path / "run", 0) and "checkpointed" in _log(tmp_path / "run", 0)


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c", "sighup"])
def test_sigterm_waits_for_every_process_to_checkpoint_and_exits_with_their_status(trainer, tmp_path, how):
    """SIGTERM to the launcher, Ctrl-C (SIGINT to its whole process group: the trainers, started in the
    background, ignore it; the launcher's `sleep` dies of it), or SIGHUP (its terminal closed: forwarded as
    SIGTERM, no trainer left running without it)."""
    workdir = tmp_path / "run"
    launcher = _local(trainer, 2, workdir, "", start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all((workdir / f"process_{p}.log").is_file()
                                                      and "started" in _log(workdir, p) for p in range(2)):
            time.sleep(0.1)
        if how == "ctrl_c":
            os.killpg(launcher.pid, signal.SIGINT)
        else:
            launcher.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGHUP)
        out, err = launcher.communicate(timeout=20)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, err  # every process stopped cleanly: not 143
    for p in range(2):  # process 0 needs 2 s to checkpoint: the launcher waited for it
        assert _log(workdir, p).splitlines()[-1] == "checkpointed"
    assert "process 0 of 2 at 127.0.0.1:" in out and out.rstrip().endswith("checkpointed")  # its log, to the end


def test_process_0s_log_reaches_the_terminal_and_arguments_pass_unchanged(trainer, tmp_path):
    for i in range(3):  # the log existed only once the process had started: tail sometimes found none
        launcher = _local(trainer, 1, tmp_path / f"run{i}", "quick")
        out, err = launcher.communicate(timeout=20)
        assert launcher.returncode == 0 and "cannot open" not in err, err
        assert f"started: --config c.py --workdir {tmp_path / f'run{i}'}" in out and "step 1 loss 0.5" in out
    # a relaunch (to resume) keeps the earlier log, below a dated line; the terminal shows only the new run
    (tmp_path / "run0" / "process_0.log").write_text("the first run's traceback\n", encoding="utf-8")
    launcher = _local(trainer, 1, tmp_path / "run0", "quick")
    out, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 0 and out.count("started") == 1 and "traceback" not in out, err
    log = _log(tmp_path / "run0", 0).splitlines()
    assert log[0] == "the first run's traceback" and log[1].startswith("==== ") and "process 0 of 1" in log[1]


@pytest.mark.parametrize("args, message", [(["2", "--config", "c.py", "--workdir"], "--workdir needs a value"),
                                           (["0", "--workdir", "w"], "usage"),
                                           (["2", "--config", "c.py"], "give --workdir")])
def test_bad_arguments_are_named(tmp_path, args, message):
    result = subprocess.run(["bash", str(LAUNCH / "local.sh"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_tpu_vm_run_prepare_and_stop_signal_the_process_and_succeed(trainer, tmp_path):
    """`stop` signals the trainer `run` started and exits 0, with or without a trainer running (a `pkill -f`
    for the trainer's name killed the worker's own shell, so `stop` failed every time); `prepare` starts the
    encoder the same way and `stop` reaches it too."""
    home, bin_dir = tmp_path / "worker", tmp_path / "gcloud-bin"
    (home / "jaxdistill" / ".venv" / "bin").mkdir(parents=True)
    (home / "jaxdistill" / ".venv" / "bin" / "activate").write_text(f'PATH="{trainer.parent}:$PATH"\n')
    bin_dir.mkdir()
    # gcloud ... ssh NAME --zone Z --worker=all --command CMD: CMD in the worker's home, as ssh runs it
    (bin_dir / "gcloud").write_text('#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 != --command ]]; do shift; done\n'
                                    'cd "$HOME" && exec bash -c "$2"\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = os.environ | {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "TPU_NAME": "t", "ZONE": "z"}
    tpu_vm = ["bash", str(LAUNCH / "tpu_vm.sh")]

    def until(path, text):  # the worker's log, once it holds `text` (or 10 s passed)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and text not in path.read_text():
            time.sleep(0.1)
        return path.read_text()

    # `prepare` like `run`, into its own log and pid file, which `stop` signals too; a glob arrives unexpanded
    for command, args, log, pid_file in (("run", ["--config", "a b.py"], "run.log", "train.pid"),
                                         ("prepare", ["--source", "tar:/d/*.tar"], "prepare.log", "prepare.pid")):
        log, pid_file = home / "jaxdistill" / log, home / "jaxdistill" / pid_file
        result = subprocess.run([*tpu_vm, command, *args], env=env, capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        pid = int(pid_file.read_text())
        try:
            assert f"started: {' '.join(args)}" in until(log, "started")
            # a second one while it runs: refused, so that `stop` still reaches the first; its log kept
            again = subprocess.run([*tpu_vm, command, *args], env=env, capture_output=True, text=True, timeout=20)
            assert again.returncode != 0 and f"still runs (pid {pid}); launch/tpu_vm.sh stop first" in again.stderr
            assert int(pid_file.read_text()) == pid and "started" in log.read_text()
            result = subprocess.run([*tpu_vm, "stop"], env=env, capture_output=True, text=True, timeout=20)
            assert result.returncode == 0, result.stderr
            # returned once the process had saved and exited: `delete` right after loses nothing
            assert "got TERM" in log.read_text() and "checkpointed" in log.read_text()
            assert not pid_file.exists()
            result = subprocess.run([*tpu_vm, "stop"], env=env, capture_output=True, text=True, timeout=20)
            assert result.returncode == 0, result.stderr  # nothing to stop: still a success
        finally:
            if "checkpointed" not in log.read_text():  # not stopped: do not leave it running
                os.kill(pid, signal.SIGKILL)
