"""The one typed config that drives every stage.

`RunConfig` is validated once, from YAML plus `--set` overrides, and then passed down as an object;
no stage reads a dict. Every field's description is its documentation (`tunelab config --help-fields`).
Relative paths resolve against the current working folder, like every peer tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config_cluster import ClusterConfig, K8sConfig, K8sStorageConfig
from tunelab.config_data import (
    CleanConfig,
    ContaminationConfig,
    DataConfig,
    DedupConfig,
    Format,
    ReplayConfig,
    SourceConfig,
    as_sources,
)
from tunelab.config_harness import HarnessConfig, as_harness
from tunelab.config_section import Section
from tunelab.config_sweep import SweepConfig
from tunelab.config_track import TrackConfig

__all__ = ["CleanConfig", "ClusterConfig", "ContaminationConfig", "DataConfig", "DedupConfig", "Format", "K8sConfig",
           "K8sStorageConfig", "ReplayConfig", "RunConfig", "Section", "SourceConfig", "SweepConfig", "as_sources"]


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a bundled name (smollm2-135m-instruct), a Hugging Face Hub ID (ORG/NAME, resolved "
        "through the huggingface_hub cache), a local Hugging Face folder, or a local .gguf file.",
    )
    revision: str | None = Field(
        None, description="Hub models: the branch, tag or commit to use (default: main). The run records the commit."
    )
    trust_remote_code: bool = Field(
        False, description="Allow a Hub model whose config needs its own Python code (auto_map); refused otherwise."
    )
    cache_dir: Path | None = Field(
        None,
        description="Where converted models are cached. Default: $TUNELAB_CACHE or ~/.cache/tunelab.",
    )
    adapter_from: Path | None = Field(
        None,
        description="Start from this run folder's trained adapter instead of a fresh one (e.g. DPO after SFT). "
        "Preference objectives then use that starting point as their reference.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Compute device; auto picks cuda, then mps, then cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. auto uses bf16 autocast where the hardware runs it fast "
        "(CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32. Weights stay float32 on CPU.",
    )


class MethodConfig(Section):
    type: Literal["lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"] = Field(
        "lora",
        description="lora (and DoRA/rsLoRA/LoRA+ via the flags), qlora (4-bit NF4 base + LoRA), ia3, "
        "prompt_tuning, prefix_tuning, or full fine-tuning.",
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules to adapt: all-linear (every linear projection but the output head) or names.",
    )
    use_dora: bool = Field(False, description="DoRA: learn magnitude and direction separately (LoRA/QLoRA).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r), stable at high ranks.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn this many times faster than A (e.g. 16)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="IA3 only: which target modules are feed-forward (default: PEFT's for the model)."
    )
    num_virtual_tokens: int = Field(20, gt=0, description="Prompt/prefix tuning: learned virtual tokens.")
    prompt_init_text: str | None = Field(
        None, description="Prompt tuning: initialize the virtual tokens from this text instead of randomly."
    )

    @model_validator(mode="after")
    def _flags_fit_the_method(self) -> MethodConfig:
        lora_only = {"use_dora": self.use_dora, "use_rslora": self.use_rslora,
                     "loraplus_lr_ratio": self.loraplus_lr_ratio is not None}
        if self.type not in ("lora", "qlora"):
            for name, used in lora_only.items():
                if used:
                    raise ValueError(f"method.{name} applies to lora and qlora, not {self.type}")
        return self


class TrainConfig(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    epochs: float = Field(1.0, gt=0, le=10_000,
                          description="Passes over the training set (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Examples per forward pass.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Forward passes per optimizer step (effective batch = batch_size x this)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for weight init, shuffling and dropout.")
    logging_steps: int = Field(1, gt=0, description="Log loss every N optimizer steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    save_steps: int | None = Field(
        100, gt=0, description="Write a checkpoint every N steps (atomically), for --resume. null: never."
    )
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep.")
    eval_steps: int | None = Field(None, gt=0, description="Compute val loss every N steps (logged to metrics.jsonl).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evals without a lower val loss (needs eval_steps)."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: add uniform noise of this scale to embeddings while training (e.g. 5)."
    )
    max_time_minutes: float | None = Field(
        None, gt=0, description="Wall-time budget: stop with a checkpoint after this long (resume later)."
    )
    liger_kernel: bool = Field(
        False, description="Fused Liger kernels (CUDA only): less memory, faster; needs the gpu extra."
    )
    padding_free: bool = Field(
        True,
        description="Each batch goes in as one row, examples end to end with position ids restarting per example "
        "(attention stays within each example): no padding, the same examples per step. sft/cpt with LoRA, QLoRA, "
        "IA3 or full, and dpo/kto/orpo/simpo (the chosen and rejected sequences of a batch in one row); off with "
        "NEFTune (its noise scales with the row length).",
    )
    chunked_loss: bool = Field(
        True,
        description="Cross-entropy on target tokens only, in chunks, gradients computed in the same pass: the "
        "full-vocabulary logits are never held in memory (Liger's fused loss does this on CUDA when liger_kernel). "
        "ORPO and SimPO (padding-free, frozen head) read their per-token log-probs the same way.",
    )
    integer_dropout_masks: bool = Field(
        True,
        description="LoRA dropout draws its masks from random integers instead of bernoulli_ (the same "
        "distribution, cheaper: tunelab.train.dropout); false keeps PEFT's nn.Dropout.",
    )
    lean_lora_forward: bool = Field(
        True,
        description="On CPU, LoRA layers move the dropout and adapter scaling onto the rank-r tensor and fold the "
        "add into B's matmul (the same function, fewer passes: tunelab.train.lora_forward); false keeps PEFT's.",
    )
    fused_norm_rope: bool = Field(
        True,
        description="On CPU, while training, RMSNorm layers and rotary position embeddings run as single autograd "
        "functions (the same functions in fewer passes: tunelab.train.fused_layers; layers of another form keep "
        "theirs); false keeps transformers' own.",
    )

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> TrainConfig:
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("train.early_stopping_patience needs train.eval_steps (how often to measure val loss)")
        return self


# Objectives trained with TRL's trainers (the others run on our own Trainer path).
TRL_OBJECTIVES = ("dpo", "simpo", "orpo", "kto", "reward", "grpo")
# The row kind each objective trains on (data/records.py): data prep checks it, the trainers rely on it.
ROW_KIND = {"sft": "chat", "cpt": "text", "dpo": "preference", "simpo": "preference", "orpo": "preference",
            "reward": "preference", "kto": "kto", "grpo": "chat"}
# Methods whose PEFT wrapper prepends learned virtual tokens (or key/values) to every row: positions and the
# decoder's inputs are not the batch's own, which rules out packing, padding-free rows and the chunked loss.
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning")


class ObjectiveConfig(Section):
    type: Literal["sft", "cpt", "dpo", "simpo", "orpo", "kto", "reward", "grpo"] = Field(
        "sft",
        description="sft: loss on assistant answers (chat rows); cpt: loss on every token (text rows); "
        "dpo / simpo / orpo: preference pairs; kto: answers labelled good or bad; reward: a reward model "
        "from preference pairs; grpo: reinforcement learning from reward functions on chat prompts.",
    )
    beta: float = Field(
        0.1, gt=0, description="Preference objectives: how far the policy may move from the reference (DPO beta; "
        "SimPO/ORPO/KTO's own scale)."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"] = Field(
        "sigmoid", description="DPO loss: sigmoid (the original DPO), ipo, hinge, robust, apo_zero, apo_down."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO: target reward margin (gamma / beta ratio).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO/robust: assumed share of flipped labels.")
    precompute_ref: bool = Field(
        True, description="DPO and KTO: compute the reference log-probs in one no-grad pass before training "
        "instead of alongside every step (TRL's precompute_ref_log_probs)."
    )
    rewards: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="GRPO rewards: exact_match, regex, json_valid, length_penalty, package.module:function, "
        "or reward_model:RUN_DIR. Summed.",
    )
    reward_regex: str | None = Field(None, description="GRPO 'regex' reward: the pattern a completion should match.")
    target_words: int = Field(50, gt=0, description="GRPO 'length_penalty' reward: words allowed before the penalty.")
    num_generations: int = Field(4, ge=2, description="GRPO: completions sampled per prompt (the group).")
    max_completion_tokens: int = Field(64, gt=0, description="GRPO: generation budget per completion.")
    temperature: float = Field(1.0, gt=0, description="GRPO: sampling temperature.")
    grpo_kl: float = Field(
        0.0, ge=0, description="GRPO: KL penalty toward the starting policy (0, TRL's default, needs no reference)."
    )


DEFAULT_METRICS = ["exact_match", "contains", "token_f1", "rouge_l", "eval_loss"]


class SuiteConfig(Section):
    name: str = Field("test", description="Suite name, used in the report and in gate rules.")
    files: list[Path] = Field(
        default_factory=list, description="Eval files (any data format with reference answers); empty: the test split."
    )
    metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        description="exact_match, contains, regex, token_f1, rouge_l, bleu, json_valid, json_schema, eval_loss, "
        "or package.module:function(prediction, reference) -> float.",
    )
    regex: str | None = Field(None, description="Pattern for the regex metric.")
    json_schema: Path | None = Field(None, description="JSON Schema file for the json_schema metric.")
    max_examples: int | None = Field(None, gt=0, description="Score only the first N examples.")

    @field_validator("files", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, (str, Path)) else value


class JudgeConfig(Section):
    base_url: str = Field(..., description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Judge model name at that endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    rubric: str = Field(
        "Score the answer from 1 (wrong or unhelpful) to 5 (correct, complete and concise) against the reference.",
        description="What the judge scores; it must answer with a number from 1 to 5.",
    )
    max_examples: int = Field(50, gt=0, description="Judge at most this many examples per system.")


class EvalConfig(Section):
    suites: list[SuiteConfig] = Field(default_factory=lambda: [SuiteConfig()], description="What to evaluate on.")
    systems: list[Literal["base", "few_shot", "tuned"]] = Field(
        default_factory=lambda: ["base", "few_shot", "tuned"],
        description="Compared systems: the base model zero-shot, the base with few_shot_k examples, the tuned model.",
    )
    few_shot_k: int = Field(3, ge=1, description="Examples from the train split shown to the few-shot base.")
    compare_runs: list[Path] = Field(
        default_factory=list, description="Other run folders (same base model) evaluated alongside, as systems."
    )

    @field_validator("compare_runs")
    @classmethod
    def _names_of_their_own(cls, value: list[Path]) -> list[Path]:
        # Each run is a system named after its folder: one named like a built-in system would take its numbers
        # (and the gate's), and two of one name would be one system.
        names = [Path(p).name for p in value]
        for name in names:
            if name in ("base", "few_shot", "tuned", "default"):
                raise ValueError(f"eval.compare_runs: a run folder named '{name}' would be taken for the {name} "
                                 "system; rename or copy the folder")
            if names.count(name) > 1:
                raise ValueError(f"eval.compare_runs: two run folders are named '{name}'; each becomes a system "
                                 "named after its folder")
        return value
    forgetting: bool = Field(True, description="Run the bundled general-capability probes on base and tuned.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per answer.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together (left padded).")
    max_examples: int | None = Field(None, gt=0, description="Evaluate only the first N examples of each suite.")
    seed: int = Field(0, description="Seed for few-shot example choice (generation is greedy).")
    cache_base_answers: bool = Field(
        True, description="Reuse the base model's answers (zero-shot, few-shot, probes) from earlier runs of the "
        "same base, prompts and settings (in the model cache's eval/ folder)."
    )
    gate: list[str] | None = Field(
        None,
        description="Rules that must hold, e.g. 'tuned.exact_match >= base.exact_match + 0.2' or "
        "'forgetting.drop <= 0.02'; `tunelab eval` exits non-zero when one fails. Unset: the default gate (tuned "
        "beats base on the first suite's first metric, is not worse than few-shot, forgetting drop <= 0.05); "
        "[]: no gate, on purpose.",
    )
    judge: JudgeConfig | None = Field(None, description="Optional LLM-as-judge scoring (1-5) of each system.")
    harness: HarnessConfig | None = Field(
        None, description="Standard benchmarks (lm-evaluation-harness tasks such as mmlu) scored on base and tuned "
        "as a forgetting measure; a list of task names is short for {tasks: [...]}."
    )

    @field_validator("harness", mode="before")
    @classmethod
    def _harness_shorthand(cls, value: object) -> object:
        return as_harness(value)

    @field_validator("gate")
    @classmethod
    def _rules_parse(cls, rules: list[str] | None) -> list[str] | None:
        from tunelab.errors import ConfigError
        from tunelab.eval.gate import check_syntax

        for rule in rules or []:
            try:
                check_syntax(rule)
            except ConfigError as err:
                raise ValueError(err.problems[0]) from None
        return rules


class OutputConfig(Section):
    dir: Path = Field(Path("runs/default"), description="Run folder: config, data, adapter, metrics, eval.")
    overwrite: bool = Field(False, description="Replace an existing run folder instead of refusing.")

    @field_validator("dir")
    @classmethod
    def _not_a_precious_folder(cls, value: Path) -> Path:
        # A run folder is replaced as a whole with output.overwrite: never let that be the working folder,
        # one of its parents, the file system root or the home folder.
        where = unsafe_output_dir(value)
        if where:
            raise ValueError(f"output.dir: {value} is {where}; a run needs a folder of its own, e.g. runs/NAME")
        return value


class RunConfig(Section):
    @field_validator("objective", mode="before")
    @classmethod
    def _objective_shorthand(cls, value: object) -> object:
        return {"type": value} if isinstance(value, str) else value

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    k8s: K8sConfig = Field(default_factory=K8sConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _registers_an_adapter(self) -> RunConfig:
        # Said before training: the registry versions adapters, and a full fine-tune leaves none to register.
        if self.track.register_as is not None and self.method.type == "full":
            raise ValueError("track.register_as: the registry versions adapters, and method full trains the whole "
                             "model (no adapter); drop register_as, or train an adapter (lora, qlora, ...)")
        return self


def unsafe_output_dir(folder: Path, config_file: Path | None = None) -> str | None:
    """Why `folder` may not be a run folder (None when it may): it is the file system root, the home folder,
    the working folder or one of its parents, or (given `config_file`) a folder holding that config."""
    target = Path(folder).expanduser().resolve()
    if target == Path(target.anchor):
        return "the file system root"
    if target == Path.home().resolve():
        return "the home folder"
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        return "the working folder" if target == cwd else "a parent of the working folder"
    if config_file is not None:
        config = Path(config_file).resolve()
        own = config == target / "config.yaml" and ((target / "manifest.json").is_file()
                                                    or (target / "data" / "manifest.json").is_file())
        if target in config.parents and not own:  # a run folder's own config.yaml (train it --resume) is fine
            return f"a folder holding the config file {config_file}"
    return None
