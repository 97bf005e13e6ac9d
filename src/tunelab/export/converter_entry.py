"""Run one of llama.cpp's converter scripts in this (child) process: `python -m tunelab.export.converter_entry
CONVERTER_DIR SCRIPT PRE_TOKENIZER ARGS...`.

It puts the converter's own `gguf-py` first on the path (the scripts are written against it) and, when
PRE_TOKENIZER is given, answers with it where the converter would refuse an unrecognised BPE pre-tokenizer
(see `tunelab.export.llamacpp.pre_tokenizer_fallback` for when tunelab knows the answer).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    folder, script, pre_tokenizer, *args = argv
    sys.path[:0] = [folder, str(Path(folder) / "gguf-py")]
    if pre_tokenizer:
        from conversion.base import TextModel

        recognised = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001, ANN202 - the converter's own signature
            try:
                return recognised(self, tokenizer)
            except NotImplementedError:
                return pre_tokenizer

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [script, *args]
    runpy.run_path(str(Path(folder) / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
