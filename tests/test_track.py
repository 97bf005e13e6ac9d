"""MLflow tracking and registry, against the embedded sqlite store and a real `mlflow server` process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_process import run_tunelab
from tests.serve.conftest import free_port  # one allocator of test ports for every worker
from tunelab import pipeline
from tunelab.artifacts import sha256_folder
from tunelab.config_file import load_run_config
from tunelab.errors import TunelabError

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def tracked_run(cfg, name: str, gate: list[str], uri: str | None = None):
    cfg = cfg.model_copy(deep=True)
    cfg.track.enabled = True
    cfg.track.tracking_uri = uri
    cfg.output.dir = Path(cfg.output.dir).parent / name
    cfg.eval.systems = ["base", "tuned"]
    cfg.eval.gate = gate
    summary = pipeline.run_all(cfg)
    return cfg, summary


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_embedded_tracking_logs_everything_and_the_adapter_reloads_exactly(tiny_config, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, summary = tracked_run(tiny_config, "tracked", ["tuned.eval_loss <= base.eval_loss"])
    uri = f"sqlite:///{Path(cfg.output.dir).parent / 'mlflow.db'}"
    client = client_for(uri)
    run = client.get_run(run_id(Path(cfg.output.dir)))
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert run.data.params["method.r"] == "16"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 12
    assert "eval.test.tuned.eval_loss" in run.data.metrics and run.data.tags["tunelab.gate_passed"] == "true"
    assert run.inputs.dataset_inputs[0].dataset.name == "tracked-data"
    assert {"adapter", "eval", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(k.startswith("system/") for k in run.data.metrics)  # CPU/memory sampled while training

    downloaded = client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "dl"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 33, 2, 40]])
    assert torch.equal(logits(summary.train.model, ids), logits(PeftModel.from_pretrained(base, downloaded), ids))


def test_registry_promotes_only_on_evidence_and_resolves_models_uris(tiny_config):
    from tunelab.registry import promote, register, resolve_run_dir, show

    good_cfg, _ = tracked_run(tiny_config, "good", ["tuned.eval_loss <= base.eval_loss"])
    bad_cfg, _ = tracked_run(tiny_config, "bad", ["tuned.exact_match >= 2"])
    uri = f"sqlite:///{Path(good_cfg.output.dir).parent / 'mlflow.db'}"
    good, new_good = register(Path(good_cfg.output.dir), "animals")
    bad, new_bad = register(Path(bad_cfg.output.dir), "animals")
    assert (str(good.version), str(bad.version)) == ("1", "2") and new_good and new_bad
    again, new = register(Path(good_cfg.output.dir), "animals")  # a re-run pipeline step: no duplicate version
    assert (str(again.version), new) == ("1", False)
    assert good.tags["tunelab.base_model"] == str(good_cfg.model.name)
    assert "<|im_start|>" in good.tags["tunelab.chat_template"] and "eval.test.tuned.eval_loss" in good.tags

    promote("animals", "1", "champion", force=False, reason=None, uri=uri)
    with pytest.raises(TunelabError, match="version 2 did not pass its eval gate"):
        promote("animals", "2", "champion", force=False, reason=None, uri=uri)
    with pytest.raises(TunelabError, match="no model 'nosuch' in the registry"):
        promote("nosuch", "1", "champion", force=False, reason=None, uri=uri)
    with pytest.raises(TunelabError, match="no version 9 of model 'animals'"):
        promote("animals", "9", "champion", force=False, reason=None, uri=uri)
    with pytest.raises(TunelabError, match="--force needs --reason"):
        promote("animals", "2", "champion", force=True, reason=None, uri=uri)
    promote("animals", "2", "challenger", force=True, reason="A/B test on 5% of traffic", uri=uri)
    versions = {row["version"]: row for row in show("animals", uri)}
    assert versions["1"]["aliases"] == ["champion"] and versions["2"]["forced"] == "A/B test on 5% of traffic"

    folder = resolve_run_dir("models:/animals@champion", uri)
    # The copy carries the run's manifest (base model, data counts, training and eval summaries) as it was.
    copied = json.loads((folder / "manifest.json").read_text())
    assert copied == json.loads((Path(good_cfg.output.dir) / "manifest.json").read_text())
    assert copied["train"]["steps"] == good_cfg.train.max_steps and copied["gate_passed"] is True
    cfg, run = load_run_config(folder)
    cfg.track.enabled, cfg.track.tracking_uri = True, uri  # evaluating a version again logs a run of its own
    cfg.eval.systems = ["base", "tuned"]
    metrics = pipeline.stage_eval(cfg, run).metrics
    evaluated = client_for(uri).get_run(run_id(folder))
    original = json.loads((Path(good_cfg.output.dir) / "eval/metrics.json").read_text())
    assert metrics["suites"]["test"]["systems"]["tuned"] == original["suites"]["test"]["systems"]["tuned"]
    with pytest.raises(TunelabError, match="no model 'animals' with alias 'nope'"):
        resolve_run_dir("models:/animals@nope", uri)
    # The adapter is checked against the hash recorded at registration: a changed artifact is refused, and a
    # cached copy changed on disk is fetched again.
    assert good.tags["tunelab.adapter_sha256"] == sha256_folder(Path(good_cfg.output.dir) / "adapter")
    (stored,) = [p for p in Path(good_cfg.output.dir).parent.rglob("adapter_model.safetensors")
                 if bad.run_id in str(p) and "artifacts" in p.parts]
    stored.write_bytes(stored.read_bytes()[:-8] + b"tampered")
    with pytest.raises(TunelabError, match="the downloaded adapter's sha256 differs from the one recorded"):
        resolve_run_dir("models:/animals/2", uri)
    cached = folder / "adapter" / "adapter_model.safetensors"
    cached.write_bytes(cached.read_bytes()[:-8] + b"tampered")
    assert sha256_folder(resolve_run_dir("models:/animals@champion", uri) / "adapter") == good.tags[
        "tunelab.adapter_sha256"]

    # The server takes the same URI: the registered adapter, on the base it was trained on.
    from tunelab.serve.server import ServeOptions, resolve_setup

    base_folder, (spec,) = resolve_setup(ServeOptions(adapters=["models:/animals@champion"], tracking_uri=uri))
    assert spec.name == "animals-champion" and spec.run_dir == folder
    assert base_folder == Path(good_cfg.model.name) and (spec.adapter_dir / "adapter_config.json").is_file()

    env = {**os.environ, "COLUMNS": "250"}
    listed = run_tunelab("runs", "list", "--tracking-uri", uri, env=env)
    assert listed.returncode == 0 and "good" in listed.stdout and "FAIL" in listed.stdout
    n_test = json.loads((Path(good_cfg.output.dir) / "eval/metrics.json").read_text())["suites"]["test"]["n_examples"]
    (good_line,) = [line for line in listed.stdout.splitlines() if " good " in line]
    assert re.search(rf"\d+\.\d% of {n_test}\b", good_line), good_line  # the exact match, and on how many
    # The version's new evaluation is named after the version and shows its method, like a trained run.
    (again,) = [line for line in listed.stdout.splitlines() if "animals v1 eval" in line]
    assert "lora" in again and "sft" in again and "pass" in again
    assert evaluated.data.tags["tunelab.source_run"] == good.run_id
    assert evaluated.data.tags["tunelab.registered_model"] == "animals/1"
    compared = run_tunelab("runs", "compare", str(good_cfg.output.dir), str(bad_cfg.output.dir), env=env)
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "eval.gate" in compared.stdout and "test.tuned.eval_loss" in compared.stdout
    assert "not comparable" not in compared.stderr  # same test set, same probes
    # A registered version compares like a run folder (its local copy: the same adapter and metrics as `good`).
    by_uri = run_tunelab("runs", "compare", str(good_cfg.output.dir), "models:/animals@champion", env={**env,
                         "MLFLOW_TRACKING_URI": uri})
    assert by_uri.returncode == 0, by_uri.stderr[-2000:]
    assert "test.tuned.eval_loss" in by_uri.stdout

    # The failed run evaluated again under another gate is new evidence: registering it makes a new version.
    bad_again, bad_run = load_run_config(Path(bad_cfg.output.dir))
    bad_again.eval.gate = ["tuned.eval_loss <= base.eval_loss"]
    pipeline.stage_eval(bad_again, bad_run)
    newer, new = register(Path(bad_cfg.output.dir), "animals")
    assert (str(newer.version), new, newer.tags["tunelab.gate_passed"]) == ("3", True, "true")

    # Scored on fewer examples, the bad run's numbers say nothing next to the good run's: compare says so.
    cfg, run = load_run_config(bad_cfg.output.dir)
    cfg.track.enabled, cfg.eval.max_examples, cfg.eval.forgetting = False, 2, False
    pipeline.stage_eval(cfg, run)
    compared = run_tunelab("runs", "compare", str(good_cfg.output.dir), str(bad_cfg.output.dir), env=env)
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert f"test: good was evaluated on {n_test} examples and bad on 2" in " ".join(compared.stderr.split())
    # Weights changed since the eval (as after training again): the eval is no evidence for them.
    weights = Path(bad_cfg.output.dir) / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"retrain!")
    with pytest.raises(TunelabError, match="eval measured other weights than its adapter/ holds now"):
        register(Path(bad_cfg.output.dir), "animals")




def start_server(store: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("mlflow server did not start")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 9)
    process.wait()


@pytest.mark.e2e
def test_real_server_tracking_registry_and_buffering_when_it_goes_away(tiny_config, tmp_path):
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    try:
        cfg, _ = tracked_run(tiny_config, "remote", ["tuned.eval_loss <= base.eval_loss"], uri=uri)
        result = run_tunelab("registry", "register", str(cfg.output.dir), "--name", "remote-model")
        assert result.returncode == 0, result.stderr[-2000:]
        result = run_tunelab("registry", "promote", "remote-model", "1", "--alias", "champion", "--tracking-uri", uri)
        assert result.returncode == 0, result.stderr[-2000:]
        assert str(client_for(uri).get_model_version_by_alias("remote-model", "champion").version) == "1"

        # The server goes away before the next run: training goes on, tracking is buffered, then synced.
        stop_server(server)
        offline = tiny_config.model_copy(deep=True)
        offline.track.enabled, offline.track.tracking_uri = True, uri
        offline.output.dir = tmp_path / "offline"
        result = pipeline.stage_train(offline, pipeline.open_run(offline, starting_training=True))
        assert result.steps == 12 and (offline.output.dir / "adapter").is_dir()
        buffered = (offline.output.dir / "tracking_buffer.jsonl").read_text().splitlines()
        assert sum(json.loads(line)["op"] == "metrics" for line in buffered) >= 12
        server = start_server(store, port)
        synced = run_tunelab("runs", "sync", str(offline.output.dir))
        assert synced.returncode == 0, synced.stderr[-2000:]
        history = client_for(uri).get_metric_history(run_id(offline.output.dir), "loss")
        assert [m.step for m in history] == list(range(1, 13))
    finally:
        stop_server(server)


def test_data_prep_training_and_export_log_to_the_run_folders_one_mlflow_run(tiny_config, tmp_path):
    """README, Tracking: `tunelab data prep` logs the config, the Dataset and its report and ends the MLflow run;
    training goes on in that run (running again while it trains); `tunelab export` logs its check to it."""
    from tunelab.config_file import dump_config

    cfg = tiny_config.model_copy(deep=True)
    cfg.track.enabled, cfg.train.max_steps = True, 2
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    env = {**os.environ, "COLUMNS": "250"}
    prepared = run_tunelab("data", "prep", str(config), env=env)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = client.get_run(run_id(cfg.output.dir))
    assert first.info.status == "FINISHED" and first.data.params["train.max_steps"] == "2"
    assert first.inputs.dataset_inputs[0].dataset.name == "run-data"
    assert {a.path for a in client.list_artifacts(first.info.run_id, "data_prep")} == {
        "data_prep/report.json", "data_prep/report.md", "data_prep/manifest.json"}

    statuses = []
    pipeline.stage_train(cfg, pipeline.open_run(cfg, starting_training=True),
                         on_metrics=lambda row: statuses.append(client.get_run(first.info.run_id).info.status))
    trained = client.get_run(run_id(cfg.output.dir))
    assert trained.info.run_id == first.info.run_id and set(statuses) == {"RUNNING"}
    assert trained.info.status == "FINISHED" and len(client.get_metric_history(first.info.run_id, "loss")) == 2

    exported = run_tunelab("export", "merge", str(cfg.output.dir), env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    run = client.get_run(first.info.run_id)
    merged = Path(cfg.output.dir) / "export" / "merged"
    report = json.loads((merged / "tunelab_export.json").read_text())
    assert run.data.metrics["export.merged.merge_max_logit_diff"] == pytest.approx(report["merge_max_logit_diff"])
    assert run.data.tags["tunelab.export.merged"] == str(merged.resolve())
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export/merged")] == [
        "export/merged/tunelab_export.json"]


def test_registry_errors_are_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_for(uri).search_registered_models()  # creates the store: `registry show` refuses one that does not exist
    env = {**os.environ, "COLUMNS": "250"}
    result = run_tunelab("registry", "show", "nope", "--tracking-uri", uri, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: registry show: Registered Model with name=nope")


@pytest.mark.e2e
def test_training_goes_on_when_the_server_dies_mid_run_and_sync_uploads_the_rest(tiny_config, tmp_path, monkeypatch,
                                                                               capsys):
    """README, Tracking: "If the server goes away mid-run, training goes on, tracking is buffered in
    RUN_DIR/tracking_buffer.jsonl with a warning, and `tunelab runs sync RUN_DIR` uploads it later." The server
    is killed right after step 4's metrics reach it (a hook on the tracker, not a timer)."""
    from tunelab.track import Tracker

    store, port = tmp_path / "server", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    log_metrics = Tracker.log_metrics

    def kill_after_step_4(self, row):
        log_metrics(self, row)
        if row.get("step") == 4 and "loss" in row and server.poll() is None:
            stop_server(server)

    monkeypatch.setattr(Tracker, "log_metrics", kill_after_step_4)
    cfg = tiny_config.model_copy(deep=True)
    cfg.track.enabled, cfg.track.tracking_uri = True, uri
    cfg.output.dir = tmp_path / "tracked"
    try:
        run = pipeline.open_run(cfg, starting_training=True)
        result = pipeline.stage_train(cfg, run)
    finally:
        if server.poll() is None:
            stop_server(server)
    assert server.returncode is not None  # it went away, mid-run

    # Training went on to the end and wrote the same adapter as a run that never tracked.
    untracked = tiny_config.model_copy(deep=True)
    untracked.output.dir = tmp_path / "untracked"
    pipeline.stage_train(untracked, pipeline.open_run(untracked, starting_training=True))
    assert result.steps == 12
    assert sha256_folder(run.adapter) == sha256_folder(untracked.output.dir / "adapter")
    warnings = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert warnings.count("is not answering") == 1  # once, not per step
    assert "tracking is buffered in" in warnings and "tunelab runs sync" in warnings

    # What the server missed is in the buffer: steps 5-12, the summary, the adapter and config, the final status.
    buffered = [json.loads(line) for line in (run.root / "tracking_buffer.jsonl").read_text().splitlines()]
    losses = [op["step"] for op in buffered if op["op"] == "metrics" and "loss" in op["metrics"]]
    assert losses == list(range(5, 13))
    assert {(op["op"], op.get("artifact_path")) for op in buffered} >= {("artifacts", "adapter"), ("artifacts", None)}
    assert buffered[-1]["op"] == "terminate" and buffered[-1]["status"] == "FINISHED"

    server = start_server(store, port)
    try:
        synced = run_tunelab("runs", "sync", str(run.root))
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert f"uploaded {len(buffered)} buffered tracking operations" in synced.stdout
        client = client_for(uri)
        tracked = client.get_run(run_id(run.root))
        assert [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")] == list(range(1, 13))
        assert tracked.info.status == "FINISHED" and tracked.data.params["train.max_steps"] == "12"
        uploaded = client.download_artifacts(tracked.info.run_id, "adapter", str(tmp_path / "uploaded"))
        assert sha256_folder(Path(uploaded)) == sha256_folder(run.adapter)
        assert not (run.root / "tracking_buffer.jsonl").exists()  # renamed once uploaded: a second sync sends nothing
        assert (run.root / "tracking_buffer.synced.jsonl").is_file()
    finally:
        stop_server(server)


def test_a_sample_eval_leaves_the_runs_evidence_alone(tiny_config):
    cfg, _ = tracked_run(tiny_config, "sampled", ["tuned.eval_loss <= base.eval_loss"])
    run = Path(cfg.output.dir)
    uri = f"sqlite:///{run.parent / 'mlflow.db'}"
    evidence = sha256_folder(run / "eval"), (run / "manifest.json").read_bytes()
    n_examples = client_for(uri).get_run(run_id(run)).data.metrics["eval.test.n_examples"]
    assert n_examples > 1
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored["eval"]["suites"][0]["max_examples"] = 200  # the suite's own limit: --max-examples still wins
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    done = run_tunelab("eval", str(run), "--max-examples", "1", env={**os.environ, "COLUMNS": "250"})
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: the gate, measured on one example, may fail
    assert "a sample eval (--max-examples), not the run's evidence" in done.stdout + done.stderr
    sample = json.loads((run / "eval-sample" / "metrics.json").read_text())
    assert sample["suites"]["test"]["n_examples"] == 1
    assert (sha256_folder(run / "eval"), (run / "manifest.json").read_bytes()) == evidence
    history = client_for(uri).get_metric_history(run_id(run), "eval.test.n_examples")
    assert [m.value for m in history] == [n_examples]  # nothing logged to the run's MLflow run either


def test_run_registers_the_evaluated_adapter_also_when_the_gate_fails(tiny_config, tmp_path):
    """track.register_as: `tunelab run` registers what it evaluated, with the gate's verdict (promotion refuses a
    failed one), then exits 1 for the failed gate as without registration."""
    from tunelab.config_file import dump_config
    from tunelab.registry import promote

    cfg = tiny_config.model_copy(deep=True)
    cfg.track.enabled = True
    cfg.eval.systems = ["base", "tuned"]
    cfg.eval.gate = ["tuned.exact_match >= 2"]  # a score above 1: fails whatever the run does
    cfg.track.register_as = "animals"
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(cfg))
    done = run_tunelab("run", str(config), env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "registered animals version 1 (gate passed: false)" in done.stdout
    assert "gate failed: tuned.exact_match" in done.stderr
    uri = f"sqlite:///{Path(cfg.output.dir).parent / 'mlflow.db'}"
    [version] = client_for(uri).search_model_versions("name='animals'")
    assert version.run_id == run_id(Path(cfg.output.dir)) and version.tags["tunelab.gate_passed"] == "false"
    with pytest.raises(TunelabError, match="version 1 did not pass its eval gate"):
        promote("animals", "1", "champion", force=False, reason=None, uri=uri)


def test_a_registry_that_does_not_answer_after_the_run_keeps_the_run_and_says_how_to_register_later(tiny_config,
                                                                                                   tmp_path):
    from tunelab.config_file import dump_config

    port = free_port()  # nothing listens there
    cfg = tiny_config.model_copy(deep=True)
    cfg.track.enabled, cfg.track.tracking_uri, cfg.track.register_as = False, f"http://127.0.0.1:{port}", "animals"
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(cfg))
    done = run_tunelab("run", str(config), env={**os.environ, "COLUMNS": "250"})
    run = Path(cfg.output.dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith(f"error: registry register: MLflow at http://127.0.0.1:{port} is not answering")
    assert errors[1:] == [f"error: the run and its eval are kept; once the store answers: tunelab registry register "
                          f"{run} --name animals"]
    assert (run / "adapter").is_dir() and json.loads((run / "eval" / "metrics.json").read_text())["suites"]
    assert str(run) in done.stdout  # the run's summary was printed before the error
