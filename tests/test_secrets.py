"""No secret leaves in clear: config values named like secrets, credentials inside URIs and the values of the
variables `*_env` keys name never reach MLflow, run folders, logs or Kubernetes manifests; Kubernetes takes
secrets from secretKeyRef; and `tunelab eval RUN` uses only a judge the caller chose."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.cli_process import run_tunelab
from tests.cluster_schemas import CONFIG_MAP, RAY_JOB
from tunelab import pipeline
from tunelab.config_file import validate_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
JUDGE_KEY = "judge-key-value-5a1f"
SECRETS = ("hunter2", "k3yv4lue", "s3cr3tpass", JUDGE_KEY)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return run_tunelab(*args, cwd=ROOT, env=env)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def secret_config(tmp_path: Path, tracking_uri: str) -> dict:
    return {
        "data": {"train": str(tmp_path / "train.jsonl")},
        "eval": {"judge": {"base_url": "https://judge:hunter2@llm.example.com/v1?api_key=k3yv4lue", "model": "j",
                           "api_key_env": "TL_TEST_JUDGE_KEY", "rubric": f"Score it. (debug: {JUDGE_KEY})"}},
        "track": {"enabled": True, "tracking_uri": tracking_uri},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_mlflow_params_config_yaml_and_run_stamp_hold_no_secret(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tunelab.track import RUN_ID_FILE, Tracker

    monkeypatch.setenv("TL_TEST_JUDGE_KEY", JUDGE_KEY)
    cfg = validate_config(secret_config(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"))
    run = pipeline.open_run(cfg, starting_training=False)
    tracker = Tracker(cfg, run)
    tracker.log_config()
    params = MlflowClient(tracking_uri=cfg.track.tracking_uri).get_run(tracker.run_id).data.params
    assert params["eval.judge.base_url"] == "https://judge:***@llm.example.com/v1?api_key=***"
    assert params["eval.judge.api_key_env"] == "TL_TEST_JUDGE_KEY"  # the name is kept, its value never
    assert params["eval.judge.rubric"] == "Score it. (debug: ***)"
    assert not leaks(json.dumps(params))
    assert not leaks(run.config.read_text()) and "https://judge:***@llm.example.com" in run.config.read_text()
    assert not leaks((run.root / RUN_ID_FILE).read_text())


def test_tracking_buffer_and_warning_hold_no_secret(tmp_path, monkeypatch, capsys):
    from tunelab.track import BUFFER, Tracker

    monkeypatch.setenv("TL_TEST_JUDGE_KEY", JUDGE_KEY)
    cfg = validate_config(secret_config(tmp_path, "http://alice:s3cr3tpass@127.0.0.1:9"))
    run = pipeline.open_run(cfg, starting_training=False)
    tracker = Tracker(cfg, run)  # nothing answers on port 9: tracking is buffered
    tracker.log_config()
    buffered = (run.root / BUFFER).read_text()
    assert '"eval.judge.base_url": "https://judge:***@llm.example.com/v1?api_key=***"' in buffered
    assert not leaks(buffered)
    assert not leaks(capsys.readouterr().out) and not leaks(run.config.read_text())
    # Uploading later: the stored config's URI is redacted, so the real one comes from the environment, and the
    # error still does not show it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://alice:s3cr3tpass@127.0.0.1:9"}
    result = run_tunelab("runs", "sync", str(run.root), cwd=ROOT, env=env)
    assert result.returncode == 2 and "http://alice:***@127.0.0.1:9" in result.stderr, result.stderr
    assert not leaks(result.stdout + result.stderr)


def test_data_manifest_holds_no_uri_credentials(tmp_path, tiny_model_dir, monkeypatch):
    from tests.conftest import animal_rows, write_jsonl

    monkeypatch.setenv("TL_TEST_JUDGE_KEY", JUDGE_KEY)
    write_jsonl(tmp_path / "train.jsonl", animal_rows(20))
    raw = secret_config(tmp_path, "http://alice:s3cr3tpass@mlflow.example.com")
    raw["model"] = {"name": str(tiny_model_dir)}
    # A system prompt is stored and served as written: one holding a secret is refused, not stored redacted.
    for prompt in (f"Never say {JUDGE_KEY}", "See https://bob:hunter2@wiki.example.com/rules"):
        raw["data"]["system_prompt"] = prompt
        with pytest.raises(ConfigError, match="data.system_prompt holds a secret"):
            validate_config(raw)
    # A URL whose parameters merely contain a secret-like word stays as written, in the stored config too.
    raw["data"]["system_prompt"] = "Cite https://help.example.com/search?keyword=refunds&design=1"
    cfg = validate_config(raw)
    pipeline.stage_data(cfg, pipeline.open_run(cfg, starting_training=False))
    for name in ("manifest.json", "report.json", "report.md"):
        assert not leaks((tmp_path / "run" / "data" / name).read_text()), name
    assert not leaks((tmp_path / "run" / "config.yaml").read_text())
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"]["system_prompt"] == raw["data"]["system_prompt"]


def test_a_real_server_run_prints_no_credentials_of_its_tracking_uri(tmp_path, tiny_model_dir):
    """MLflow prints "View run at URI/#/..." with the tracking URI as given: with user:password@ in it, that line
    put the password in every log of `data prep` and training."""
    from tests.conftest import animal_rows, write_jsonl
    from tests.test_track import client_for, free_port, start_server, stop_server

    (tmp_path / "server").mkdir()
    port = free_port()
    server = start_server(tmp_path / "server", port)
    try:
        write_jsonl(tmp_path / "train.jsonl", animal_rows(20))
        raw = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "train.jsonl")},
               "track": {"tracking_uri": f"http://alice:s3cr3tpass@127.0.0.1:{port}"},
               "output": {"dir": str(tmp_path / "run")}}
        done = run_cli("data", "prep", str(write_yaml(tmp_path / "c.yaml", raw)))
        assert done.returncode == 0, done.stderr[-3000:]
        assert not leaks(done.stdout + done.stderr), done.stdout[-3000:]
        logged = client_for(f"http://127.0.0.1:{port}").search_runs(["0", "1"])
        assert [run.info.status for run in logged] == ["FINISHED"]  # it did log, through the credentialed URI
    finally:
        stop_server(server)


K8S = {
    "data": {"train": "data/train.jsonl"},
    "output": {"dir": "runs/orders"},
    "cluster": {"num_workers": 2},
    "k8s": {"image": "registry.example.com/tunelab:0.1.0", "storage": {"pvc": "tunelab-data"}},
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_rayjob_takes_secrets_from_secret_key_refs(tmp_path):
    raw = json.loads(json.dumps(K8S))
    raw["track"] = {"tracking_uri": "https://alice:s3cr3tpass@mlflow.example.com"}
    raw["k8s"]["env"] = {"LOG_LEVEL": "debug"}
    raw["k8s"]["secret_env"] = {"HF_TOKEN": "hf-credentials/token", "MLFLOW_TRACKING_URI": "mlflow/uri"}
    out = tmp_path / "rayjob.yaml"
    result = run_cli("k8s", "rayjob", str(write_yaml(tmp_path / "job.yaml", raw)), "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert not leaks(text) and not leaks(result.stdout + result.stderr)
    config_map, rayjob = yaml.safe_load_all(text)
    jsonschema.validate(config_map, CONFIG_MAP)
    jsonschema.validate(rayjob, RAY_JOB)
    assert "https://alice:***@mlflow.example.com" in config_map["data"]["config.yaml"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-credentials", "key": "token"}}}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow", "key": "uri"}}
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "debug"}


@pytest.mark.parametrize("change, expected", [
    ({"k8s": {"env": {"HF_TOKEN": "hf_s3cr3tpass"}}},
     "k8s.env.HF_TOKEN: looks like a secret, and k8s.env values are written in clear into the manifest; put it in a "
     "Kubernetes Secret and set k8s.secret_env: {HF_TOKEN: SECRET_NAME/KEY} instead"),
    ({"k8s": {"env": {"DATA_URL": "https://u:s3cr3tpass@data.example.com/x"}}}, "k8s.env.DATA_URL: looks like a secret"),
    ({"k8s": {"secret_env": {"HF_TOKEN": "s3cr3tpass"}}}, "k8s.secret_env.HF_TOKEN: expected SECRET_NAME/KEY"),
    ({"track": {"tracking_uri": "https://alice:s3cr3tpass@mlflow.example.com"}},
     "track.tracking_uri: holds credentials, which the pods' env would show in clear; put the URI in a Kubernetes "
     "Secret and set k8s.secret_env: {MLFLOW_TRACKING_URI: SECRET_NAME/KEY}"),
])
def test_plain_secrets_for_kubernetes_are_refused_with_a_hint(tmp_path, change, expected):
    raw = json.loads(json.dumps(K8S))
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    path = write_yaml(tmp_path / "job.yaml", raw)
    result = run_cli("k8s", "rayjob", str(path), "--out", str(tmp_path / "out.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert expected in line and not leaks(line), line
    assert not (tmp_path / "out.yaml").exists()


def stored_run(tmp_path: Path) -> Path:
    """A run folder whose stored config (written by someone else) names a judge."""
    run = tmp_path / "theirs"
    run.mkdir()
    raw = {"data": {"train": "x.jsonl"}, "output": {"dir": str(run)},
           "eval": {"judge": {"base_url": "http://attacker.example.com/v1", "model": "m", "api_key_env": "HOME"}}}
    write_yaml(run / "config.yaml", raw)
    return run


def eval_cli(monkeypatch, *args: str):
    from typer.testing import CliRunner

    from tunelab.cli import app

    seen = {}

    def fake_stage_eval(cfg, run, sample=False):
        seen["judge"] = cfg.eval.judge
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "stage_eval", fake_stage_eval)
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return seen["judge"]


def test_eval_never_uses_a_stored_runs_judge(tmp_path, monkeypatch):
    run = stored_run(tmp_path)
    assert eval_cli(monkeypatch, str(run)) is None
    judge = eval_cli(monkeypatch, str(run), "--set", "eval.judge.base_url=http://127.0.0.1:8000/v1",
                     "--set", "eval.judge.model=mine")
    assert (judge.base_url, judge.model, judge.api_key_env) == ("http://127.0.0.1:8000/v1", "mine", "OPENAI_API_KEY")
    mine = write_yaml(tmp_path / "mine.yaml", {"data": {"train": "x.jsonl"}, "eval": {"judge": {
        "base_url": "http://127.0.0.1:8001/v1", "model": "own", "api_key_env": "MY_JUDGE_KEY"}}})
    judge = eval_cli(monkeypatch, str(run), "--judge-config", str(mine))
    assert (judge.base_url, judge.api_key_env) == ("http://127.0.0.1:8001/v1", "MY_JUDGE_KEY")


@pytest.mark.parametrize("uri,redacted", [
    ("postgresql://mlflow:Ab/c9+Xy@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),  # "/" in a password
    ("mysql://root:p@ss@db/x", "mysql://root:***@db/x"),
    ("https://tok3n@host/x", "https://***@host/x"),
    ("https://h/s?X-Amz-Signature=zz&X-Amz-Credential=cc&sv=1&sig=qq",
     "https://h/s?X-Amz-Signature=***&X-Amz-Credential=***&sv=1&sig=***"),
    ("https://h/?apikey=1&api_key=2&access_token=4&session=5",
     "https://h/?apikey=***&api_key=***&access_token=***&session=***"),
    # Words that merely contain a secret-like one, and paths with an "@": left as they are.
    ("https://help.example.com/search?keyword=refunds&design=1&monkey=2", None),
    ("https://medium.com/@user/post", None),
    ("http://host:8080/path", None),
    ("models:/animals@champion", None),  # a registered model's alias, not a login
    ("https:/bob:hunter2@data.example.com/t.jsonl", "https:/bob:***@data.example.com/t.jsonl"),  # as pathlib prints it
])
def test_uri_credentials_are_redacted_and_nothing_else(uri, redacted):
    from tunelab.redaction import redact_uris

    assert redact_uris(uri) == (redacted or uri)


def test_error_messages_name_endpoints_without_their_credentials(tmp_path):
    from tunelab.artifacts import RunPaths
    from tunelab.errors import TunelabError
    from tunelab.sweep.trial import ERROR_FILE, _record_error

    config = write_yaml(tmp_path / "c.yaml", {"model": {"name": str(tmp_path)}, "output": {"dir": str(tmp_path / "r")},
                                               "data": {"train": "https://bob:hunter2@data.example.com/train.jsonl"}})
    done = run_cli("data", "prep", str(config))
    assert done.returncode == 2 and "data.example.com" in done.stderr and "hunter2" not in done.stderr, done.stderr
    # A sweep trial's error goes into its folder, sweep.json and an MLflow tag: redacted there too.
    run = RunPaths(tmp_path / "trial")
    _record_error(run, TunelabError("eval.judge: the judge at https://judge:hunter2@llm.example.com/v1 failed"))
    recorded = (run.root / ERROR_FILE).read_text()
    assert "llm.example.com" in recorded and "hunter2" not in recorded


def test_a_judge_that_echoes_the_key_it_was_sent_does_not_put_it_in_the_error(tmp_path, monkeypatch):
    """A real HTTP endpoint answering 401 as OpenAI's does, quoting the key: the error names the endpoint only."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tunelab.artifacts import RunPaths
    from tunelab.config import JudgeConfig
    from tunelab.errors import TunelabError
    from tunelab.eval.judge import judge_rows
    from tunelab.redaction import redact_message
    from tunelab.sweep.trial import ERROR_FILE, _record_error

    class EchoesTheKey(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {self.headers['Authorization']}",
                                         "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoesTheKey)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_JUDGE", JUDGE_KEY)  # a name that does not look like a secret's: only judge.py knows
        cfg = JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="j", api_key_env="MY_JUDGE")
        rows = [{"prompt": "q", "reference": "r", "outputs": {"tuned": "a"}}]
        with pytest.raises(TunelabError, match="Incorrect API key provided: Bearer \\*\\*\\*") as failed:
            judge_rows(cfg, rows, ["tuned"])
        assert not leaks(str(failed.value))
    finally:
        server.shutdown()
    # Secret-named variables' values are removed from any message shown (the CLI) or stored (a sweep trial's error).
    monkeypatch.setenv("SOME_API_KEY", "s3cr3tpass-value")
    assert redact_message("refused: Bearer s3cr3tpass-value") == "refused: Bearer ***"
    monkeypatch.setenv("PWD", str(tmp_path))  # named like a password, but the working folder: paths stay readable
    assert redact_message(f"{tmp_path}/x.yaml: not found") == f"{tmp_path}/x.yaml: not found"
    run = RunPaths(tmp_path / "trial")
    _record_error(run, TunelabError("the endpoint said: s3cr3tpass-value is not valid"))
    assert not leaks((run.root / ERROR_FILE).read_text())
