"""llama.cpp's own tools: the HF -> GGUF converters and the quantizer, at the version of the installed library.

The quantizer ships inside the `llama-cpp-python` wheel (`llama_model_quantize` in its C bindings). The
converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, with the `gguf-py` package they are written
against) are not in the wheel, only in the same version's source distribution, under vendor/llama.cpp/. On
first use tunelab fetches that sdist with pip, checks its sha256 against the pinned value, and extracts only
the converter files (and llama.cpp's MIT LICENSE, kept beside them) into `$TUNELAB_CACHE/llama.cpp/`. The
converter version therefore always matches the library that loads its output.

The converters run in a subprocess: they import their own `gguf-py`, which must not mix with the `gguf`
package transformers uses in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from tunelab.artifacts import atomic_dir, sha256_file, write_json_atomic
from tunelab.errors import LlamaCppError
from tunelab.progress import console

PINNED_VERSION = "0.3.36"
# sha256 of llama_cpp_python-VERSION.tar.gz as published; a different file is refused.
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("conversion/", "gguf-py/gguf/")
# llama.cpp file types (include/llama.h, enum llama_ftype) for the quantizations tunelab offers.
FTYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}


def installed_version() -> str:
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise LlamaCppError(f"GGUF export needs llama-cpp-python; install it with "
                            f"`pip install llama-cpp-python=={PINNED_VERSION}` (or `make install`)") from None
    if version not in SDIST_SHA256:
        raise LlamaCppError(f"GGUF export is pinned to llama-cpp-python {PINNED_VERSION}, found {version}; "
                            f"install `llama-cpp-python=={PINNED_VERSION}`")
    return version


def converter_dir(cache: Path) -> Path:
    """The folder holding llama.cpp's converters for the installed version, fetched on first use."""
    version = installed_version()
    folder = cache / "llama.cpp" / f"converter-{version}"
    marker = folder / "tunelab_source.json"
    if marker.is_file() and all((folder / name).is_file() for name in CONVERTER_FILES):
        return folder
    console.print(f"Fetching llama.cpp's converter (llama-cpp-python {version} sdist, once) ...")
    with tempfile.TemporaryDirectory(prefix="tunelab-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", "--no-deps",
               "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise LlamaCppError(f"could not download the llama-cpp-python {version} sdist for its converter: {last}")
        digest = sha256_file(sdists[0])
        if digest != SDIST_SHA256[version]:
            raise LlamaCppError(f"{sdists[0].name}: sha256 {digest} is not the pinned {SDIST_SHA256[version]}")
        with atomic_dir(folder) as staging:
            _extract_converter(sdists[0], staging)
            write_json_atomic(staging / "tunelab_source.json", {
                "package": "llama-cpp-python", "version": version, "sdist_sha256": digest,
                "license": "MIT, (c) The ggml authors: see LICENSE in this folder"})
    return folder


def _extract_converter(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        root = tar.getmembers()[0].name.split("/")[0] + "/vendor/llama.cpp/"
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(root):
                continue
            rel = member.name[len(root):]
            if rel in CONVERTER_FILES or rel.startswith(CONVERTER_DIRS):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())


def pre_tokenizer_fallback(hf_folder: Path) -> str | None:
    """llama.cpp's name for a tokenizer its converter does not recognise by hash, when the answer is certain.

    The converter identifies BPE pre-tokenizers by hashing how a test string splits, from a list of published
    models; a new tokenizer (tunelab's test models, any custom one) is refused. A plain byte-level BPE with
    GPT-2's split regex and no normalizer is exactly llama.cpp's "gpt-2" pre-tokenizer; NFC plus Qwen2's split
    regex before a regex-free byte-level step is its "qwen2" (what transformers writes for any Qwen2 tokenizer);
    anything else stays refused. The export checks afterwards that llama.cpp tokenizes the probe prompts as
    transformers does.
    """
    path = hf_folder / "tokenizer.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if ((spec.get("normalizer") or {}).get("type") == "NFC" and len(steps) == 2
            and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "qwen2"
    return None


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def run_converter(cache: Path, script: str, args: list[str], pre_tokenizer: str | None = None) -> None:
    """Run one of llama.cpp's converter scripts; a failure becomes a one-line error with its last message."""
    folder = converter_dir(cache)
    cmd = [sys.executable, "-m", "tunelab.export.converter_entry", str(folder), script, pre_tokenizer or "", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise LlamaCppError(f"llama.cpp {script} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")


def quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer (the library call behind `llama-quantize`), on all CPU cores."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # the quantizer prints a line per tensor from C
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise LlamaCppError(f"llama.cpp could not quantize {source.name} to {quant} (status {status})")


if __name__ == "__main__":
    # `python -m tunelab.export.llamacpp`: fetch the converter ahead of time (make install does).
    where = converter_dir(Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser())
    print(f"llama.cpp converter: {where}")
