"""Methods: build the trainable model for `method.type`, and load a trained one back.

PEFT methods (LoRA and its variants, QLoRA, IA3, prompt and prefix tuning) save a standard PEFT adapter
folder; full fine-tuning saves a whole model folder. Everything downstream (eval, export, serve) goes
through `load_trained`, so it never needs to know which method made a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.artifacts import RunPaths
from tunelab.chat import TemplateSetup
from tunelab.config import MethodConfig, RunConfig
from tunelab.errors import ModelError, RunFolderError
from tunelab.models import Precision, load_model
from tunelab.vocab import attach_adapter, fit_embeddings, trainable_tokens


def training_inputs(cfg: RunConfig) -> tuple[Precision, Path, Any, TemplateSetup | None]:
    """What every trainer starts from: the precision, the base model's folder, its tokenizer (with a chat
    template: the one that will be saved beside the adapter), and how that template was set up, with the
    marker tokens it needed added to the vocabulary (None for cpt, which trains on raw text)."""
    from tunelab.chat import setup_chat_template
    from tunelab.models import load_tokenizer, pick_precision, resolve_model

    base_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(base_path)
    setup = None
    if cfg.objective.type != "cpt":  # continued pre-training reads raw text: no template, no new tokens
        setup = setup_chat_template(tokenizer, cfg.data.chat_template)
    return pick_precision(cfg.model), base_path, tokenizer, setup


def load_base(folder: Path, method: MethodConfig, precision: Precision) -> Any:
    """The frozen base model as the method needs it: 4-bit NF4 for QLoRA, full precision otherwise."""
    if method.type != "qlora":
        return load_model(folder, precision)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if precision.device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
    )
    from tunelab.models import trusts_code

    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=torch.float32, device_map={"": precision.device},
        trust_remote_code=trusts_code(folder),
    )


def peft_config(method: MethodConfig, base_folder: Path, token_rows: dict[str, Any] | None = None) -> Any:
    """The method's PEFT config; `token_rows`: LoraConfig arguments that train new tokens' rows
    (tunelab.vocab.trainable_tokens)."""
    import peft

    if method.type in ("lora", "qlora"):
        return peft.LoraConfig(
            r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
            # "all-linear" adapts every linear projection except the output head (PEFT's own rule).
            target_modules=method.target_modules, use_dora=method.use_dora, use_rslora=method.use_rslora,
            task_type="CAUSAL_LM", **(token_rows or {}),
        )
    if method.type == "ia3":
        # PEFT knows which projections are attention and which feed-forward for common architectures.
        targets = None if method.target_modules == "all-linear" else method.target_modules
        return peft.IA3Config(target_modules=targets, feedforward_modules=method.feedforward_modules,
                              task_type="CAUSAL_LM")
    if method.type == "prompt_tuning":
        init = {"prompt_tuning_init": peft.PromptTuningInit.RANDOM}
        if method.prompt_init_text:
            init = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": method.prompt_init_text,
                    "tokenizer_name_or_path": str(base_folder)}
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens, **init)
    if method.type == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens)
    raise ValueError(f"no PEFT config for method {method.type}")


def build_trainable(cfg: RunConfig, base_folder: Path, precision: Precision, tokenizer: Any = None,
                    template: TemplateSetup | None = None) -> Any:
    """Load the base and make exactly the method's parameters trainable, plus the embedding rows of the tokens
    the chat template added (the embeddings grow to the tokenizer first: see tunelab.vocab)."""
    new_ids = tokenizer.convert_tokens_to_ids(list(template.added_tokens)) if template and tokenizer else []
    model = load_base(base_folder, cfg.method, precision)
    if tokenizer is not None:
        fit_embeddings(model, len(tokenizer))
    if cfg.method.type == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.model.adapter_from is not None:
        start = RunPaths(cfg.model.adapter_from)
        if not start.has_adapter:
            raise RunFolderError(f"model.adapter_from: {cfg.model.adapter_from} holds no trained adapter")
        return _fast_adapters(cfg, precision, attach_adapter(model, start.adapter, is_trainable=True))
    if new_ids and cfg.method.type not in ("lora", "qlora"):
        raise ModelError(f"method.type: {cfg.method.type} cannot train the {len(new_ids)} tokens the chat template "
                         "adds to this model's vocabulary; use lora, qlora or full, or a template the model knows")
    return _fast_adapters(cfg, precision, get_peft_model(model, peft_config(cfg.method, base_folder,
                                                                            trainable_tokens(model, new_ids))))


def _fast_adapters(cfg: RunConfig, precision: Precision, model: Any) -> Any:
    """Three changes to PEFT's adapter forward that leave the method as it is.

    - PEFT casts each adapter's input to the adapter weights' dtype (float32); under autocast the adapter's
      matmul casts it straight back to bf16, so a bf16 input (o_proj's, down_proj's) makes two full copies for
      nothing (and its dropout runs on 4-byte values). With float32 base weights every input outside autocast is
      float32 already, so the cast is never needed: switched off (the same loss to the last bit, 4% faster).
    - LoRA dropout masks from random integers (tunelab.train.dropout).
    - On CPU, the scalars and the add of each adapter branch moved onto its rank-r tensor and B's matmul
      (tunelab.train.lora_forward)."""
    import torch

    autocast_over_fp32 = precision.autocast_dtype is not None and precision.weights_dtype == torch.float32
    if cfg.method.type == "lora" and autocast_over_fp32:
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if cfg.train.integer_dropout_masks:
        from tunelab.train.dropout import use_keep_mask_dropout

        use_keep_mask_dropout(model)
    if cfg.train.lean_lora_forward and cfg.method.type == "lora" and autocast_over_fp32 and precision.device == "cpu":
        from tunelab.train.lora_forward import use_lean_lora_forward

        use_lean_lora_forward(model)
    return model


def load_trained(cfg: RunConfig, run_root: Path, base_folder: Path, precision: Precision) -> tuple[Any, Any]:
    """(tuned model, base model or None). For PEFT runs the base is the tuned model with its adapter
    disabled (one copy in memory); for full fine-tuning the base is a second model."""
    run = RunPaths(run_root)
    if run.kind == "adapter":
        return attach_adapter(load_base(base_folder, cfg.method, precision), run.adapter).eval(), None
    if run.kind == "full":
        tuned, base = load_model(run.model, precision).eval(), load_model(base_folder, precision).eval()
        # The base answers through the tuned tokenizer, which may hold marker tokens the training added.
        fit_embeddings(base, tuned.get_input_embeddings().weight.shape[0])
        return tuned, base
    from tunelab.run_replace import kept_aside

    aside = kept_aside(run)
    if aside.is_dir():  # an output.overwrite training stopped before it finished: the old run waits beside it
        raise RunFolderError(f"{run_root}: no trained adapter or model yet: its training (output.overwrite) stopped "
                             f"before it finished, and the run it replaces is kept at {aside}; `tunelab train "
                             "--resume` finishes it")
    raise RunFolderError(f"{run_root}: no trained adapter or model; run `tunelab train` first")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable, total = 0, 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
