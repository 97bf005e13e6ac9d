"""Artifacts on disk: atomic writes, content hashes, manifests, run-folder layout.

Stages meet only at artifacts. Every file or folder is written to a temporary path beside its final
place and renamed into place, so an interrupted stage never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab import __version__

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # a complete checkpoint; a save in progress is staged elsewhere


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_folder(folder: Path) -> str:
    """One hash of a folder's files: their paths and contents, in a stable order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sha256_text("".join(f"{p.relative_to(folder).as_posix()}:{sha256_file(p)}" for p in files))


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp makes the file owner-only; give it the mode a plain open() would (0666 less the umask),
        # so teammates and other pods sharing a run folder can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _writer(final: Path) -> str:
    """The start of a temporary name beside `final` that says who writes it: host and process. A writer killed
    outright (SIGKILL, out of memory, power loss) cannot clean up; the next writer of `final` on the same host
    sees from the name that the process is gone and removes what it left (a merged model is gigabytes)."""
    return f".{final.name}.{socket.gethostname()}.{os.getpid()}."


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(final: Path) -> None:
    """Remove the temporary siblings of `final` whose writer on this host is no longer running. A writer killed
    between the two renames of a swap (systems without an atomic exchange) left the previous content aside and
    `final` missing: that content is put back."""
    host = socket.gethostname()
    prefix = f".{final.name}."
    with contextlib.suppress(OSError):
        for path in final.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            rest = path.name[len(prefix):]  # HOST.PID.<random or "part">.tmp, or HOST.PID.old; a host may hold dots
            if rest.endswith(".tmp"):
                writer = rest[: -len(".tmp")].rpartition(".")[0]
            elif rest.endswith(".old"):
                writer = rest[: -len(".old")]
            else:
                continue
            writer_host, _, pid = writer.rpartition(".")
            if writer_host != host or not pid.isdigit() or _running(int(pid)):
                continue
            if rest.endswith(".old") and not final.exists():
                os.replace(path, final)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def partial_path(final: Path) -> Path:
    """A temporary file name beside `final` for a writer that renames it into place; what a killed writer of `final`
    left there is removed first."""
    remove_stale_temps(final)
    return final.with_name(f"{_writer(final)}part.tmp")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it vanishes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=_writer(final), suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; a finished artifact is as readable as any folder
    try:
        yield tmp
        if final.exists() and exchange(tmp, final):  # one atomic step: `final` is never missing
            shutil.rmtree(tmp, ignore_errors=True)  # now the old content
        elif final.exists():  # no exchange here: two renames, with a moment between them where `final` is gone
            old = final.with_name(f"{_writer(final)}old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or the file
    system cannot, and nothing was changed."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a C library before glibc 2.28
        return False
    at_cwd = -100
    done = renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """The common head of every manifest.json: what made the artifact and when."""
    return {"kind": kind, "tunelab_version": __version__, "created_unix": round(time.time(), 3), **fields}


@dataclass(frozen=True)
class RunPaths:
    """The layout of a run folder: the contract between train, eval, export and serve."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def registered(self) -> Path:
        """In a registered version's local copy only: which version it is (name, version, source run id)."""
        return self.root / "registered.json"

    @property
    def adapter(self) -> Path:
        """Where PEFT methods (LoRA, QLoRA, DoRA, prompt tuning, ...) save the trained adapter."""
        return self.root / "adapter"

    @property
    def adapter_config(self) -> Path:
        return self.adapter / "adapter_config.json"

    @property
    def model(self) -> Path:
        """Where full fine-tuning saves the whole trained model."""
        return self.root / "model"

    def trained_for(self, method_type: str) -> Path:
        """Where training with this method.type writes (and exports read) the trained weights."""
        return self.model if method_type == "full" else self.adapter

    @property
    def has_adapter(self) -> bool:
        return self.adapter_config.is_file()

    @property
    def has_full_model(self) -> bool:
        return (self.model / "config.json").is_file()

    @property
    def kind(self) -> Literal["adapter", "full"] | None:
        """What training left here, judged by the files a loader needs; the adapter wins if both are present."""
        if self.has_adapter:
            return "adapter"
        return "full" if self.has_full_model else None

    @property
    def is_trained(self) -> bool:
        return self.kind is not None

    @property
    def trained(self) -> Path:
        """The trained weights' folder (the adapter if there is one, else the full model): the tokenizer and
        chat template used in training are saved beside them."""
        return self.adapter if self.has_adapter else self.model

    @property
    def holds_trained_folder(self) -> bool:
        """An adapter/ or model/ folder is here, complete or not (a folder a loader would refuse counts too)."""
        return self.adapter.exists() or self.model.exists()

    @property
    def holds_training(self) -> bool:
        """Training has written here: a trained folder, or a checkpoint of an interrupted run (an empty
        checkpoints/ folder, a run killed before its first checkpoint, holds nothing to keep or resume)."""
        return self.holds_trained_folder or self.has_checkpoint

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(CHECKPOINT.match(p.name) and p.is_dir()
                                                 for p in self.checkpoints.iterdir())

    @property
    def chat_template(self) -> Path:
        return self.root / "chat_template.jinja"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_sample(self) -> Path:
        """A quick eval on a few examples (`tunelab eval --max-examples`): never the run's evidence."""
        return self.root / "eval-sample"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded: its header does not parse, or its tensors run past its end."""
    import struct

    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return "not a readable safetensors file"
    return None if path.stat().st_size >= 8 + length + end else "cut short"


def trained_weights_problem(run: RunPaths) -> str | None:
    """Why the run's trained folder cannot be loaded (a file missing, unreadable or cut short), or None."""
    folder = run.trained
    if run.has_adapter:
        try:
            json.loads(run.adapter_config.read_text())
        except (OSError, ValueError):
            return f"{run.adapter_config} is unreadable"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} holds no weights (*.safetensors)"
    return next((f"{path}: {problem}" for path in weights if (problem := safetensors_problem(path))), None)
