"""Hub IDs and hf:// data, resolved through real Hugging Face cache layouts built in tmp (nothing is downloaded).

huggingface_hub and datasets read HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT once, at import, so the `hub`
fixture sets their constants as well as the environment (which subprocesses read).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.cli_process import run_tunelab
from tests.conftest import animal_rows, write_jsonl
from tunelab import pipeline
from tunelab.config import ModelConfig, SourceConfig
from tunelab.config_file import validate_config
from tunelab.errors import DataError, ModelError
from tunelab.hub import is_hub_id
from tunelab.models import locate_model, resolve_model, tokenizer_for

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face cache; returns HF_HUB_CACHE."""
    import datasets
    from huggingface_hub import constants

    home = tmp_path / "hf"
    env = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_DATASETS_CACHE": home / "datasets", "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return home / "hub"


def go_online(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)


def put_model(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """What snapshot_download leaves behind: snapshots/COMMIT/<files> and refs/REF holding the commit. (The real
    cache links snapshot files to blobs/; huggingface_hub reads only snapshots/ and refs/.)"""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def put_dataset(cache: Path, repo_id: str, splits: dict[str, list[dict]], commit: str = COMMIT) -> None:
    """What an earlier online `load_dataset(ORG/NAME)` leaves in the datasets cache, where offline loads look:
    ORG___NAME/default/0.0.0/COMMIT/ with the Arrow files and dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    sources = cache.parent / f"{name}-files"
    sources.mkdir(parents=True, exist_ok=True)
    files = {split: str(write_jsonl(sources / f"{split}.jsonl", rows)) for split, rows in splits.items()}
    Json(cache_dir=str(cache), dataset_name=name, hash=commit, config_id="default", data_files=files).download_and_prepare()
    shutil.move(cache / name, cache / f"{org}___{name}")  # a Hub load keeps it under the repo's namespace


def test_a_hub_id_is_one_slash_and_nothing_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for name in ("models/mine", "a/b/c", "acme/model.gguf", "./model", "~/model", "smollm2-135m-instruct"):
        assert not is_hub_id(name), name


def test_hub_model_resolves_offline_from_the_cache_by_ref_and_commit(hub, tiny_model_dir):
    snapshot = put_model(hub, "acme/tiny", tiny_model_dir)
    cfg = ModelConfig(name="acme/tiny")
    source = locate_model(cfg)
    assert (source.kind, source.path, source.commit) == ("hub", snapshot, COMMIT)
    assert resolve_model(cfg) == snapshot
    assert len(tokenizer_for(cfg)) == len(tokenizer_for(ModelConfig(name=str(tiny_model_dir))))

    tagged = put_model(hub, "acme/tiny", tiny_model_dir, commit=OTHER, refs=("v1",))
    assert resolve_model(ModelConfig(name="acme/tiny", revision="v1")) == tagged
    assert locate_model(ModelConfig(name="acme/tiny", revision=OTHER)).commit == OTHER


def test_not_cached_while_offline_says_how_to_get_it(hub, tiny_model_dir):
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="acme/missing"))
    (problem,) = info.value.problems
    assert problem.startswith("model.name: acme/missing: not in the Hugging Face cache")
    assert "run once online" in problem and "HF_HUB_OFFLINE=0" in problem
    put_model(hub, "acme/tiny", tiny_model_dir)
    with pytest.raises(ModelError, match=r"^model.name: acme/tiny \(revision v9\): not in the Hugging Face cache"):
        resolve_model(ModelConfig(name="acme/tiny", revision="v9"))
    with pytest.raises(ModelError, match=r"^model.name: acme/a--b: not a valid Hub ID: Cannot have -- or \.\."):
        locate_model(ModelConfig(name="acme/a--b"))


def test_a_mistyped_local_folder_is_named_as_such(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="models/mien"))  # ./models exists, models/mien does not: a typo, not a repo
    (problem,) = info.value.problems
    assert problem.startswith(f"model.name: models/mien (read as a Hub ID: there is no folder {tmp_path}/models/mien)"
                              ": not in the Hugging Face cache")
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="acme/missing"))  # no ./acme: plainly a Hub ID
    assert "read as a Hub ID" not in info.value.problems[0]


def test_unreachable_hub_is_one_line_fast_and_falls_back_to_the_cache(hub, tiny_model_dir, monkeypatch):
    go_online(monkeypatch, "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="acme/missing"))
    assert time.perf_counter() - started < 10
    (problem,) = info.value.problems
    assert problem.startswith("model.name: acme/missing: cannot reach the Hub at http://127.0.0.1:9 (ConnectError")
    snapshot = put_model(hub, "acme/tiny", tiny_model_dir)
    assert resolve_model(ModelConfig(name="acme/tiny")) == snapshot  # what was fetched before still works


def test_pickle_only_repo_is_refused_before_loading(hub, tiny_model_dir, tmp_path):
    repo = tmp_path / "pickled"
    repo.mkdir()
    shutil.copy(tiny_model_dir / "config.json", repo)
    (repo / "pytorch_model.bin").write_bytes(b"not loaded")
    put_model(hub, "acme/pickled", repo)
    for call in (locate_model, resolve_model):
        with pytest.raises(ModelError) as info:
            call(ModelConfig(name="acme/pickled"))
        assert info.value.problems == [
            "model.name: acme/pickled: the repo has only pickle weights (pytorch_model.bin); unpickling can run "
            "arbitrary code, so tunelab loads only safetensors; pick a repo or revision with model.safetensors"]


REMOTE_CODE = """
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "tunelab-custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
    ran_repo_code = True
"""


def test_remote_code_is_refused_unless_trusted_and_then_runs(hub, tiny_model_dir, tmp_path, tiny_config):
    repo = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, repo)
    (repo / "modeling_custom.py").write_text(REMOTE_CODE)
    config = json.loads((repo / "config.json").read_text())
    config.update(model_type="tunelab-custom", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (repo / "config.json").write_text(json.dumps(config))
    put_model(hub, "acme/custom", repo)
    with pytest.raises(ModelError, match=r"^model.name: acme/custom: the repo needs its own Python code \(config.json: "
                                         r"auto_map\), which tunelab does not run unless you set model.trust_remote_code"):
        locate_model(ModelConfig(name="acme/custom"))
    assert locate_model(ModelConfig(name="acme/custom", trust_remote_code=True)).kind == "hub"
    # Trusted, the repo's own model class is what trains, evaluates and reloads.
    tiny_config.model.name, tiny_config.model.trust_remote_code = "acme/custom", True
    tiny_config.train.max_steps = 2
    run = pipeline.open_run(tiny_config, starting_training=True)
    result = pipeline.stage_train(tiny_config, run)
    assert getattr(result.model.get_base_model(), "ran_repo_code", False)
    assert pipeline.stage_eval(tiny_config, run).metrics["suites"]["test"]["systems"]["tuned"]


def test_training_records_the_commit_and_names_the_hub_id_in_the_adapter(hub, tiny_model_dir, tiny_config):
    from peft import AutoPeftModelForCausalLM

    put_model(hub, "acme/tiny", tiny_model_dir)
    tiny_config.model.name = "acme/tiny"
    tiny_config.train.max_steps = 2
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)

    manifest = json.loads(run.manifest.read_text())
    assert manifest["model"] == {"name": "acme/tiny", "kind": "hub", "revision": "main", "commit": COMMIT}
    adapter = json.loads((run.adapter / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("acme/tiny", COMMIT)
    # What a user elsewhere does: the base comes from their own Hub cache, found by the ID and commit alone.
    model = AutoPeftModelForCausalLM.from_pretrained(run.adapter)
    assert model.peft_config["default"].base_model_name_or_path == "acme/tiny"


def test_local_bases_are_named_as_configured_in_the_adapter(tiny_config):
    tiny_config.train.max_steps = 2
    run = pipeline.open_run(tiny_config, starting_training=True)
    pipeline.stage_train(tiny_config, run)
    adapter = json.loads((run.adapter / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (tiny_config.model.name, None)
    model = json.loads(run.manifest.read_text())["model"]
    assert model == {"name": tiny_config.model.name, "kind": "folder", "path": str(Path(tiny_config.model.name))}


def test_hub_dataset_paths_stay_strings():
    assert SourceConfig(path="hf://acme/orders").path == "hf://acme/orders"
    assert SourceConfig(path=Path("hf://acme/orders")).path == "hf://acme/orders"  # Path had collapsed the //
    assert SourceConfig(path="data/train.jsonl").path == Path("data/train.jsonl")
    with pytest.raises(ValueError, match="a Hub dataset is written hf://ORG/NAME"):
        SourceConfig(path="hf://orders")
    with pytest.raises(ValueError, match="split and subset apply to hf:// Hub datasets only"):
        SourceConfig(path="train.jsonl", split="train")


def test_hf_data_loads_offline_through_the_datasets_cache(hub, tiny_config):
    from tunelab.data.prepare import prepare_data

    put_dataset(hub.parent / "datasets", "acme/animals", {"train": animal_rows(40), "test": animal_rows(8, 1, 1000)})
    cfg = validate_config({**tiny_config.model_dump(mode="json"),
                           "data": {"train": "hf://acme/animals", "test": {"path": "hf://acme/animals"}}})
    prepared = prepare_data(cfg, Path(cfg.output.dir) / "data")
    assert prepared.dataset.counts()["test"] == 8  # data.test reads the test split by default
    assert sum(prepared.dataset.counts().values()) == 48
    sources = json.loads((Path(cfg.output.dir) / "data" / "manifest.json").read_text())["sources"]
    assert [(s["path"], s["split"], s["commit"]) for s in sources] == [("hf://acme/animals", "train", COMMIT),
                                                                     ("hf://acme/animals", "test", COMMIT)]
    assert len({s["sha256"] for s in sources}) == 2

    with pytest.raises(DataError) as info:
        prepare_data(validate_config({**cfg.model_dump(mode="json"), "data": {"train": "hf://acme/missing"}}),
                     Path(cfg.output.dir) / "other")
    (problem,) = info.value.problems
    assert problem.startswith("hf://acme/missing split train: not in the datasets cache")
    with pytest.raises(DataError, match=r"^hf://acme/animals split validation: Unknown split"):
        prepare_data(validate_config({**cfg.model_dump(mode="json"),
                                      "data": {"train": {"path": "hf://acme/animals", "split": "validation"}}}),
                     Path(cfg.output.dir) / "other")


def test_cli_bad_hub_id_is_one_error_line_and_exit_code_2(hub, tiny_config, tmp_path):
    config = tmp_path / "hub.yaml"
    raw = tiny_config.model_dump(mode="json")
    raw["model"]["name"] = "acme/missing"
    config.write_text(json.dumps(raw))  # JSON is YAML
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = run_tunelab("run", str(config), "--dry-run", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: model.name: acme/missing: not in the Hugging Face cache ({hub}) "
                                          "and HF_HUB_OFFLINE is set; run once online to download it, or set "
                                          "HF_HUB_OFFLINE=0"]
