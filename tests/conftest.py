"""Shared fixtures: a tiny random Llama and a byte-level BPE tokenizer, both built in code (no download)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tunelab.track import MLFLOW_SETTINGS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What tunelab sets for MLflow whenever it makes a client, set from the start: a worker's environment then stays the
# same whether or not a test has tracked in-process yet (see _environment_as_it_was).
for _key, _value in MLFLOW_SETTINGS.items():
    os.environ.setdefault(_key, _value)

# `make test` runs the suite in parallel workers (pytest-xdist). torch gives each process one thread per core, so
# two workers on a 2-core machine would run four busy threads; share the cores out instead. Set before torch is
# imported, and inherited by the CLI subprocesses the tests start.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _environment_as_it_was() -> object:
    """Each test starts from the worker's environment: tunelab sets variables when called in-process (MLflow's
    retry settings, Ray's), and a variable left behind would leak into the next test. It would also send every
    later CLI command to a fresh process instead of a fork of the worker's preloaded one (tests/cli_process.py
    forks only when the environment matches the one that process started with)."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start a local Ray cluster run one after another on one worker: two clusters at once would
    each claim the machine's CPUs and object store (`--dist loadgroup` honours the group)."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Extract the animal from the sentence.", "The quick brown fox jumps over the lazy dog.",
    "answer: cat", "answer: dog", "answer: fox", "answer: owl", "I saw a cat near the river today.",
    "What is two plus two? Four.", "Hello there, how are you?", "system user assistant",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"-()[]{}",
]


def build_tokenizer(folder: Path, chat_template: str = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with hidden size 64 and its tokenizer, saved as a normal HF folder.

    Init std 0.2 (not 0.02) so that LoRA can move the logits within a few steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, initializer_range=0.2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from tunelab.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


ANIMALS = ["cat", "dog", "fox", "owl"]


def animal_rows(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    """A learnable toy task: name the animal in the sentence. Rows numbered from `start` are distinct,
    so dedup keeps them all and disjoint ranges never count as contamination."""
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        animal = rng.choice(ANIMALS)
        rows.append({
            "id": f"ex-{i}",
            "messages": [
                {"role": "user", "content": f"Extract the animal: on day {i} I saw a {animal}."},
                {"role": "assistant", "content": f"answer: {animal}"},
            ],
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_run_config(folder: Path, model_dir: Path):
    """A RunConfig for a fast run of the tiny model on the toy task, its data and output in `folder`."""
    from tunelab.config_file import validate_config

    train = write_jsonl(folder / "train.jsonl", animal_rows(48))
    test = write_jsonl(folder / "test.jsonl", animal_rows(8, seed=1, start=1000))
    return validate_config({
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": str(train), "test": str(test), "val_fraction": 0.1},
        "train": {"learning_rate": 1e-2, "max_steps": 12, "batch_size": 8, "warmup_ratio": 0.0},
        # gate []: 12 steps of a random tiny model prove nothing the default gate asks; tests of it set it back.
        "eval": {"max_new_tokens": 6, "batch_size": 4, "few_shot_k": 2, "forgetting": False, "gate": []},
        "track": {"enabled": False},  # the tracking tests turn it on; a fresh MLflow store per test costs seconds
        "output": {"dir": str(folder / "run")},
    })


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path):
    """A RunConfig for a fast run of the tiny model on the toy task, in a fresh folder."""
    return tiny_run_config(tmp_path, tiny_model_dir)


@pytest.fixture
def browser(tmp_path: Path):
    """A headless Chromium driven over DevTools (tests/serve/browser.py); skips without one, except in CI."""
    from tests.serve.browser import Browser, require_chromium

    require_chromium()
    chromium = Browser(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray cluster for one test module (2 CPUs, no dashboard), shut down after it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()
