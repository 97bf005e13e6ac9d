"""A user's mistake at the `tunelab` command line ends in one line naming the thing, a non-zero exit, and no
traceback; a normal run prints no library warnings."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli_process import run_tunelab
from tests.conftest import tiny_run_config
from tunelab.config_file import dump_config


def tunelab(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            fresh: bool = False) -> subprocess.CompletedProcess:
    return run_tunelab(*args, timeout=600, env={**os.environ, "COLUMNS": "250", **(env or {})}, cwd=cwd, fresh=fresh)


def one_error(done: subprocess.CompletedProcess, *named: str) -> str:
    """The single `error:` line, after checking the exit status and that no traceback was printed."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr[-3000:]
    for text in named:
        assert text in errors[0], errors[0]
    return errors[0]


def dead_server() -> str:
    """An http:// URI where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir) -> Path:
    from tests.serve.conftest import make_lora_run

    return make_lora_run(tmp_path_factory.mktemp("cli-errors") / "run", tiny_model_dir, 1)


def copy_run(lora_run: Path, folder: Path, tracking_uri: str | None = None) -> Path:
    """A copy of the LoRA run whose config tracks into `tracking_uri` (default: beside it)."""
    shutil.copytree(lora_run, folder)
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["output"]["dir"] = str(folder)
    raw["track"]["tracking_uri"] = tracking_uri
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.mark.parametrize(("args", "says"), [
    (["run"], "Missing argument 'config'"),
    (["run", "x.yaml", "--bogus"], "No such option: --bogus"),
    (["serve", "--port", "abc"], "Invalid value for '--port'"),
    (["run", "x.yaml", "--set"], "Option '--set' requires an argument"),
    (["registry", "register", "runs/x"], "Missing option '--name'"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
])
def test_command_line_usage_mistakes_are_one_usage_error_not_a_traceback(args, says):
    done = tunelab(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and says in last, done.stderr[-3000:]


def test_eval_refuses_a_negative_max_examples(lora_run):
    one_error(tunelab("eval", str(lora_run), "--max-examples", "-1"), "--max-examples -1")
    one_error(tunelab("eval", str(lora_run), "--max-examples", "0"), "--max-examples 0")  # not "no limit"


def test_runs_list_against_a_bad_store(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    one_error(tunelab("runs", "list", "--tracking-uri", f"sqlite:///{missing}"), f"no MLflow store at {missing}")
    assert not missing.parent.exists()  # listing never creates an empty store in the wrong place
    uri = dead_server()
    one_error(tunelab("runs", "list", "--tracking-uri", uri), f"runs list: MLflow at {uri} is not answering")
    one_error(tunelab("runs", "list", "--tracking-uri", "bogus://store"), "runs list:", "'bogus://store'")
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    one_error(tunelab("runs", "list", "--tracking-uri", f"sqlite:///{tmp_path / 'notes.db'}"),
              "runs list: file is not a database")


def test_registry_register_against_a_bad_store(lora_run, tmp_path):
    uri = dead_server()
    run = copy_run(lora_run, tmp_path / "dead", uri)
    one_error(tunelab("registry", "register", str(run), "--name", "animals"),
              f"registry register: MLflow at {uri} is not answering")
    assert not (run / "tracking_buffer.jsonl").exists()  # nothing was buffered for a store that never answered
    run = copy_run(lora_run, tmp_path / "bogus", "bogus://store")
    one_error(tunelab("registry", "register", str(run), "--name", "animals"), "registry register:", "'bogus://store'")


def test_a_dead_registry_is_reported_as_dead_not_as_a_missing_version(lora_run, tmp_path):
    uri = dead_server()
    one_error(tunelab("registry", "promote", "animals", "1", "--tracking-uri", uri),
              f"registry promote: MLflow at {uri} is not answering")
    one_error(tunelab("serve", "models:/animals/1", "--engine", "vllm", "--tracking-uri", uri),
              f"models:/animals/1: MLflow at {uri} is not answering")
    one_error(tunelab("eval", "models:/animals@champion", env={"MLFLOW_TRACKING_URI": uri}),
              f"models:/animals@champion: MLflow at {uri} is not answering")


def test_a_registered_run_without_a_chat_template_resolves(lora_run, tmp_path):
    """Continued pre-training of a base model trains without a chat template: its registered version still
    resolves to a run folder (and a version it does not hold is named as missing)."""
    run = copy_run(lora_run, tmp_path / "cpt")
    for template in (run / "chat_template.jinja", run / "adapter" / "chat_template.jinja"):
        template.unlink()
    registered = tunelab("registry", "register", str(run), "--name", "plain")
    assert registered.returncode == 0, registered.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"TUNELAB_CACHE": str(tmp_path / "cache")}
    served = tunelab("serve", "models:/plain/1", "--engine", "vllm", "--tracking-uri", uri, env=env)
    assert served.returncode == 0 and "Traceback" not in served.stderr, served.stderr[-3000:]
    assert "--lora-modules" in served.stdout and "--chat-template" not in served.stdout
    [copy] = (tmp_path / "cache" / "registry" / "plain").iterdir()
    assert (copy / "adapter" / "adapter_config.json").is_file() and not (copy / "chat_template.jinja").exists()
    one_error(tunelab("serve", "models:/plain/7", "--engine", "vllm", "--tracking-uri", uri, env=env),
              "registry: no version 7 of model 'plain'")


def test_serve_refuses_unknown_devices_and_dtypes_before_loading_anything(lora_run):
    one_error(tunelab("serve", str(lora_run), "--dtype", "bf16"), "--dtype bf16", "bfloat16")
    one_error(tunelab("serve", str(lora_run), "--device", "gpu"), "--device gpu", "cuda")


def test_vllm_refuses_a_lora_rank_above_512(lora_run, tmp_path):
    run = copy_run(lora_run, tmp_path / "wide")
    adapter_config = run / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "r": 1024}))
    one_error(tunelab("serve", f"wide={run}", "--engine", "vllm"), "'wide' (rank 1024)", "up to 512")


def test_cuda_out_of_memory_becomes_the_runbooks_advice(tiny_config, tmp_path, monkeypatch, capsys):
    """A real torch.OutOfMemoryError raised from the decoder's forward pass in the second training step."""
    import torch
    from transformers import LlamaModel

    from tunelab import cli

    forward, calls = LlamaModel.forward, []

    def out_of_memory_on_step_2(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 23.57 GiB of which 1.20 GiB is free.")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", out_of_memory_on_step_2)
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(tiny_config))
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", str(config)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err and len(calls) == 2
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: training ran out of GPU memory (it asked for 2.00 GiB more): ")
    run = Path(tiny_config.output.dir)
    for advice in ("lower train.batch_size (now 8)", "train.gradient_accumulation_steps (now 1)",
                   "train.gradient_checkpointing=true", "method.type=qlora",
                   f"`tunelab estimate {run / 'config.yaml'} --no-probe`", "docs/runbooks/fine-tune-oom.md"):
        assert advice in line
    assert Path(__file__).parents[1].joinpath("docs/runbooks/fine-tune-oom.md").is_file()
    assert not (run / "adapter").exists()


def test_a_tiny_run_prints_no_library_warnings(tmp_path, tiny_model_dir):
    """Tracking on (MLflow's dataset source), and a chat template that adds tokens with checkpoints saved (PEFT
    saving the resized embedding), as well as training and evaluating (transformers' deprecations)."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg.track.enabled = True
    cfg.data.chat_template = "llama3"
    cfg.train.save_steps = 6
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    done = tunelab("run", str(config), cwd=tmp_path, fresh=True)  # warnings at import time print only in a fresh one
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert (tmp_path / "run" / "mlflow_run.json").is_file()
    assert "Warning" not in done.stderr, done.stderr[-3000:]


def test_an_export_of_damaged_weights_is_one_error_and_stale_evidence_is_said(lora_run, tmp_path, capsys):
    run = copy_run(lora_run, tmp_path / "cut")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # a copy cut short: safetensors raised from deep inside
    error = one_error(tunelab("export", "merge", str(run), "--out", str(tmp_path / "m1")))
    assert error == f"error: {run}: its trained weights cannot be loaded: {weights}: cut short; train it again"
    weights.unlink()
    assert "holds no weights" in one_error(tunelab("export", "merge", str(run), "--out", str(tmp_path / "m2")))
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    # Evidence of other weights (trained further since its eval): what an export says under what it wrote.
    from tunelab.artifacts import RunPaths, sha256_folder
    from tunelab.cli_ship import _warn_without_evidence

    run = RunPaths(copy_run(lora_run, tmp_path / "stale"))
    run.eval.mkdir(exist_ok=True)
    for measured, stale in ((sha256_folder(run.trained), False), ("0" * 64, True)):
        (run.eval / "metrics.json").write_text(json.dumps({"trained_sha256": measured, "gate": []}))
        _warn_without_evidence("stale", run)
        assert ("changed after it was evaluated" in " ".join(capsys.readouterr().err.split())) is stale
