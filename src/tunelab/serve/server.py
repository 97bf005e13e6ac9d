"""`tunelab serve`: resolve the base and the adapters, load them once, and serve them over HTTP.

With `--engine vllm` the same choice of base and adapters becomes a `vllm serve` command line instead
(printed, or run with --launch), for GPU users who want vLLM's paged attention and multi-LoRA kernels.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.serve.adapters import (
    AdapterSpec,
    ServeError,
    adapter_tokenizer,
    check_same_base,
    parse_adapter_arg,
    registry_name,
    resolve_adapter,
    vllm_max_lora_rank,
)

LOOPBACK_NAMES = {"localhost"}
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCHING = ("continuous", "static")


@dataclass
class ServeOptions:
    adapters: list[str] = field(default_factory=list)  # "NAME=RUN" or "RUN" (a run folder or models:/ URI)
    base: str | None = None  # model name or folder; default: the base the first adapter was trained on
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = "TUNELAB_API_KEY"
    admin_key_env: str = "TUNELAB_ADMIN_KEY"  # unset: the /admin endpoints do not exist
    allow_roots: list[Path] = field(default_factory=list)
    allow_registry: list[str] = field(default_factory=list)  # registered model names admin may load ("*": any)
    max_batch: int = 16
    batching: str = "continuous"  # continuous: rows join and leave at every decode step; static: whole batches
    max_queue: int = 64
    request_timeout: float = 120.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None  # None: the model's context minus the request's max_tokens
    max_stop: int = 4  # OpenAI's limits on `stop`
    max_stop_chars: int = 64
    max_adapters: int = 16
    device: str = "auto"
    dtype: str = "auto"
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        for option, value, choices in (("--device", self.device, DEVICES), ("--dtype", self.dtype, DTYPES),
                                       ("--batching", self.batching, BATCHING)):
            if value not in choices:
                raise ServeError(f"{option} {value}: choose {', '.join(choices[:-1])} or {choices[-1]}")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_hosts(port: int) -> set[str]:
    names = ("127.0.0.1", "localhost", "[::1]")
    return {f"{n}:{port}" for n in names} | (set(names) if port == 80 else set())


def api_key_for(options: ServeOptions) -> str | None:
    key = os.environ.get(options.api_key_env) or None
    if key is None and not is_loopback(options.host):
        raise ServeError(f"--host {options.host} reaches beyond this machine: set an API key in "
                         f"${options.api_key_env} (clients send it as 'Authorization: Bearer KEY')")
    return key


def allowed_roots(options: ServeOptions) -> list[Path]:
    """Where admin-loaded adapters may come from: --allow-root folders, else ./runs and the folders holding
    the adapters given at start-up."""
    if options.allow_roots:
        return [p.expanduser().resolve() for p in options.allow_roots]
    roots = [Path("runs").resolve()]
    for text in options.adapters:
        _, source = parse_adapter_arg(text)
        if not source.startswith("models:/"):
            roots.append(Path(source).expanduser().resolve().parent)
    return list(dict.fromkeys(roots))


def allowed_registry(options: ServeOptions) -> list[str]:
    """Registered models admin may load: --allow-root models:/NAME (models:/ for any), else those given at start."""
    if options.allow_roots or options.allow_registry:
        return ["*" if n in ("", "*") else n for n in options.allow_registry]
    return [registry_name(source) for _, source in map(parse_adapter_arg, options.adapters)
            if source.startswith("models:/")]


def resolve_setup(options: ServeOptions) -> tuple[Path, list[AdapterSpec]]:
    """(base folder, adapters), checked: names unique, every adapter a LoRA trained on that base."""
    from tunelab.config import ModelConfig
    from tunelab.models import resolve_model

    specs: list[AdapterSpec] = []
    for text in options.adapters:
        name, source = parse_adapter_arg(text)
        if any(s.name == name for s in specs):
            raise ServeError(f"two adapters are named '{name}'; name them with NAME=RUN")
        # Adapters named on the command line are the operator's own choice: no root applies to them.
        specs.append(resolve_adapter(name, source, None, options.tracking_uri))
    if options.base is not None:
        base_folder = resolve_model(ModelConfig(name=options.base))
    elif specs:
        base_folder = specs[0].base_folder
    else:
        base_folder = resolve_model(ModelConfig())
    for spec in specs:
        check_same_base(spec, base_folder)
    return base_folder, specs


def build_server(options: ServeOptions) -> tuple[Any, Any]:
    """(FastAPI app, Engine) with the base and every adapter loaded."""
    import torch

    from tunelab.chat import setup_chat_template
    from tunelab.models import Precision, load_model, load_tokenizer, pick_device
    from tunelab.serve.api import ServerSettings, create_app
    from tunelab.serve.engine import Engine

    key = api_key_for(options)
    base_folder, specs = resolve_setup(options)
    if len(specs) > options.max_adapters:
        raise ServeError(f"{len(specs)} adapters given but --max-adapters is {options.max_adapters}")
    device = pick_device(options.device, "--device")
    # fp32 on CPU by default: batched and one-at-a-time answers then agree token for token.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if options.dtype != "auto":
        dtype = getattr(torch, options.dtype)
    adapter_tokenizers = {spec.name: adapter_tokenizer(spec) for spec in specs}
    base_tokenizer = load_tokenizer(base_folder)
    if not base_tokenizer.chat_template and adapter_tokenizers:
        # A base model without a template chats in its first adapter's (as `base` does in eval): the adapter's
        # tokenizer is the base's plus any marker tokens that template needed.
        base_tokenizer = next(iter(adapter_tokenizers.values()))
    elif not base_tokenizer.chat_template:
        setup_chat_template(base_tokenizer, None, add_tokens=False)  # the untrained base has no rows for new ones
    engine = Engine(load_model(base_folder, Precision(device, None, dtype)), base_tokenizer,
                    max_batch=options.max_batch, max_queue=options.max_queue, max_adapters=options.max_adapters,
                    batching=options.batching)
    tokenizers: dict[str, Any] = {"base": base_tokenizer, **adapter_tokenizers}
    for spec in specs:
        engine.load_adapter(spec)
    settings = ServerSettings(
        api_key=key, admin_key=os.environ.get(options.admin_key_env) or None, allowed_roots=allowed_roots(options),
        allowed_registry=allowed_registry(options), default_max_tokens=options.default_max_tokens,
        max_tokens_limit=options.max_tokens_limit, request_timeout=options.request_timeout,
        tracking_uri=options.tracking_uri, base_folder=base_folder, max_body_bytes=options.max_body_bytes,
        max_prompt_tokens=options.max_prompt_tokens, max_stop=options.max_stop, max_stop_chars=options.max_stop_chars,
        # Keyless loopback: a web page could reach us through DNS rebinding, so the Host header must name us.
        allowed_hosts=None if key else loopback_hosts(options.port),
    )
    return create_app(engine, settings, tokenizers), engine


def serve(options: ServeOptions) -> None:
    import uvicorn

    from tunelab.progress import console
    from tunelab.serve.memory import keep_memory_flat

    trimming = keep_memory_flat()  # before the engine's and the server's threads start (arenas are per thread)
    app, engine = build_server(options)
    url = f"http://{options.host}:{options.port}"
    console.print(f"serving {', '.join(engine.model_names())} at {url}/v1 (playground: {url}/)"
                  + ("" if os.environ.get(options.api_key_env) else "; no API key (loopback only)"))
    console.print(batching_note(engine))
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
        if trimming is not None:
            trimming.set()


def batching_note(engine: Any) -> str:
    if engine.batching == "static":
        return "static batching: a request waits for the batch before it to finish"
    if engine.exact:
        return (f"continuous batching, up to {engine.max_batch} rows; rows padded to multiples of {engine.quantum} "
                "(this machine's matmuls are row-invariant there): greedy answers equal the answers decoded alone")
    return (f"continuous batching, up to {engine.max_batch} rows; warning: no padding height makes this "
            "machine's matmuls row-invariant, so a greedy answer can differ by float rounding from the same request "
            "decoded alone")


def vllm_command(options: ServeOptions) -> tuple[list[str], list[str]]:
    """The `vllm serve` command line that serves the same base and adapters, and notes for the operator."""
    from tunelab.vocab import token_layout

    base_folder, specs = resolve_setup(options)
    command = ["vllm", "serve", str(base_folder), "--served-model-name", "base", "--host", options.host,
               "--port", str(options.port), "--max-num-seqs", str(options.max_batch)]
    templates = {(s.run_dir / "chat_template.jinja").read_text() for s in specs
                 if (s.run_dir / "chat_template.jinja").is_file()}
    if len(templates) > 1:
        raise ServeError("these adapters were trained with different chat templates; vLLM applies one template "
                         "to every model it serves: start one vLLM server per template")
    with_tokens = [s.name for s in specs if token_layout(s.adapter_dir)]
    if with_tokens:
        raise ServeError(f"adapter(s) {', '.join(with_tokens)} add chat-marker tokens to the vocabulary, which vLLM's "
                         "LoRA support cannot load; serve the merged model instead (tunelab export merge, then "
                         "vllm serve the merged folder)")
    if specs:
        rank = vllm_max_lora_rank({s.name: s.rank for s in specs})
        command += ["--enable-lora", "--max-loras", str(len(specs)), "--max-lora-rank", str(rank),
                    "--lora-modules"]
        command += [f"{s.name}={s.adapter_dir}" for s in specs]
        chat_template = specs[0].run_dir / "chat_template.jinja"
        if chat_template.is_file():
            # The template the adapters were trained with, not whatever the base folder carries.
            command += ["--chat-template", str(chat_template)]
    if os.environ.get(options.api_key_env):
        # vLLM reads its key from VLLM_API_KEY: an --api-key argument would show the key to anyone who lists processes.
        command = [f"VLLM_API_KEY=${options.api_key_env}", *command]
    notes = [f"note: adapter '{s.name}' was trained with a system prompt; vLLM will not add it: send it as the "
             "first message, or serve its merged export (tunelab export merge), whose template adds it"
             for s in specs if s.system_prompt]
    if specs and (unstopped := _end_of_turn_vllm_misses(adapter_tokenizer(specs[0]), base_folder)):
        marker, token = unstopped
        notes.append(f"note: the template's end of turn {marker} (token {token}) is neither the tokenizer's eos nor "
                     "in the base model's generation config, so vLLM will not stop answers there: send "
                     f"\"stop_token_ids\": [{token}] with each request, or serve the merged export (tunelab export "
                     "merge), whose generation_config.json lists it")
    return command, notes


def _end_of_turn_vllm_misses(tokenizer: Any, base_folder: Path) -> tuple[str, int] | None:
    """The template's end-of-turn token when vLLM would not stop at it: vLLM stops at the tokenizer's eos and the
    eos ids of the base folder's generation_config.json (a base model given a template whose markers its vocabulary
    already holds, such as Llama 3's <|eot_id|>)."""
    import json

    from tunelab.families import end_of_turn, single_token_id

    marker = end_of_turn(tokenizer) if tokenizer.chat_template else None
    token = single_token_id(tokenizer, marker) if marker else None
    if token is None:
        return None
    path = base_folder / "generation_config.json"
    if not path.is_file():
        path = base_folder / "config.json"
    configured = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    known = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    return None if token in known else (marker, token)


def launch_vllm(command: list[str], options: ServeOptions) -> None:
    if shutil.which("vllm") is None:
        raise ServeError("--launch: no `vllm` on PATH; install vLLM (GPU) or run the printed command elsewhere")
    env = dict(os.environ)
    if command[0].startswith("VLLM_API_KEY="):
        env["VLLM_API_KEY"] = os.environ.get(options.api_key_env, "")
        command = command[1:]
    os.execvpe(command[0], command, env)


def printable(command: list[str]) -> str:
    """The command as a shell line; an environment assignment in front keeps its variable unexpanded until run."""
    return " ".join(f'{a.split("=", 1)[0]}="{a.split("=", 1)[1]}"' if a.startswith("VLLM_API_KEY=") else shlex.quote(a)
                    for a in command)
