"""Quiet by default: rank 0's progress and messages reach the console once;
library chatter (anything a worker writes to stdout/stderr, C code included)
goes to the run's log file and shows with --verbose."""
from __future__ import annotations

import io
import json
import logging
import os
import warnings

from raygen.train import console
from raygen.train.console import (PROGRESS_FILE, RUN_LOG, ConsoleFollower, ProgressWriter, library_logs_to,
                                  worker_console)


def test_worker_console_routes_messages_to_the_driver_and_chatter_to_run_log(tmp_path, capfd):
    with worker_console(tmp_path, rank=0, progress=True):
        console.say("resuming from step-00000004")
        console.progress(10, 20, {"loss": 1.5, "lr": 1e-3, "images_per_s": 100.0, "eta_s": 5.0})
        print("Reporting training result 1: TrainingReport(...)", flush=True)
        os.write(2, b"[W socket.cpp:207] c10d warning from C++\n")
    with worker_console(tmp_path, rank=1, progress=True):
        console.say("a message of rank 1")  # not for the console: the log
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing reached this process's own console
    events = [json.loads(line) for line in (tmp_path / PROGRESS_FILE).read_text().splitlines()]
    assert [e["kind"] for e in events] == ["message", "progress"]
    assert events[0]["text"] == "resuming from step-00000004" and events[1]["step"] == 10
    log = (tmp_path / RUN_LOG).read_text()
    assert "Reporting training result" in log and "c10d warning from C++" in log and "rank 1" in log
    assert console._sink is None  # restored


def write_events(folder, *events):
    writer = ProgressWriter(folder / PROGRESS_FILE)
    for e in events:
        writer(e)


def progress_event(step, log=True):
    return {"kind": "progress", "step": step, "total": 30, "log": log, "loss": 2.0 - step / 100, "lr": 1e-3,
            "images_per_s": 250.0, "eta_s": 30 - step}


def test_follower_prints_one_line_per_log_step_when_not_a_terminal(tmp_path):
    write_events(tmp_path, progress_event(10))  # an earlier run's event in the same folder: not shown again
    out = io.StringIO()
    follower = ConsoleFollower(tmp_path, total=30, out=out, tty=False)
    write_events(tmp_path, progress_event(11, log=False), progress_event(20),
                 {"kind": "message", "text": "eval at step 20: val_loss 1.8000"}, progress_event(30))
    follower.poll()
    lines = out.getvalue().splitlines()
    assert lines == ["[raygen] step 20/30 loss 1.8000 lr 1.00e-03 img/s 250 eta 10s",
                     "[raygen] eval at step 20: val_loss 1.8000",
                     "[raygen] step 30/30 loss 1.7000 lr 1.00e-03 img/s 250 eta 0s"]


def test_follower_draws_a_bar_on_a_terminal_and_echoes_run_log_when_verbose(tmp_path):
    out = io.StringIO()
    with ConsoleFollower(tmp_path, total=30, out=out, tty=True, verbose=True, poll_s=0.05) as follower:
        write_events(tmp_path, *(progress_event(s, log=s % 10 == 0) for s in range(1, 31)),
                     {"kind": "message", "text": "eval at step 30: val_loss 1.7000"})
        with open(tmp_path / RUN_LOG, "a") as f:
            f.write("DeepSpeed info: something\n")
        follower.poll()
    text = out.getvalue()
    assert "[raygen] step" not in text  # no plain progress lines: the bar
    assert "30/30" in text and "eval at step 30" in text and "DeepSpeed info: something" in text
    assert text.count("\n") <= 4  # the bar's final line, the message, the log line


def test_library_logs_go_to_the_run_log_unless_verbose(tmp_path, capfd):
    with library_logs_to(tmp_path / RUN_LOG, verbose=False):
        logging.getLogger("mlflow.store.db.utils").warning("Creating initial MLflow database tables...")
        logging.getLogger("ray.data").warning("Progress bars disabled")
        warnings.warn("torch.distributed.all_gather_into_tensor is deprecated", FutureWarning)
    out, err = capfd.readouterr()
    assert "MLflow" not in out + err and "deprecated" not in out + err
    log = (tmp_path / RUN_LOG).read_text()
    assert "Creating initial MLflow database tables" in log and "Progress bars disabled" in log and "deprecated" in log
    with library_logs_to(tmp_path / RUN_LOG, verbose=True):
        logging.getLogger("mlflow").warning("shown with --verbose")
    assert "shown with --verbose" in capfd.readouterr().err


def test_progress_hook_prints_log_steps_in_process(capsys):
    """Without a driver to follow the events (tests, notebooks), log steps print plainly."""
    from engine_toys import INFO, ListBatches, toy_images
    from raygen.models.registry import build_model
    from raygen.spec import parse_spec
    from raygen.train.hooks import ProgressHook
    from raygen.train.strategy import DDPStrategy
    from raygen.train.trainer import Trainer

    spec = parse_spec({"model": {"family": "toy"}, "data": {"batch_size": 8},
                       "train": {"steps": 6, "log_every": 3, "eval_every": 100, "checkpoint_every": 100}})
    Trainer(spec=spec, data_info=INFO, make_generator=lambda: build_model("toy", spec.model.config, INFO),
            strategy=DDPStrategy(precision="fp32", grad_accum=1, loss_scale_floor=1, initial_loss_scale=1),
            train_data=ListBatches(toy_images(64), 8), val_data=None, hooks=[ProgressHook(3, 6)],
            checkpoints=None).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[raygen] step")]
    assert [line.split()[2] for line in lines] == ["3/6", "6/6"]
