"""Peak training memory of a Llama-style decoder, term by term, from shapes alone (no weights, no torch).

Every term names the tensors it stands for. The activation terms were read off what autograd really saves
for backward in tunelab's training step (transformers' Llama with SDPA attention, PEFT LoRA, bitsandbytes
NF4, torch autocast), listed with `torch.autograd.graph.saved_tensors_hooks`; tests/test_estimate.py
compares the formula with that measurement on a small model.

Byte counts: weights stay float32 (tunelab keeps master weights in fp32 and computes in bf16 through
autocast), so `compute_bytes` is 2 under bf16/fp16 autocast and 4 without.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FP32 = 4
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NF4_DQ_BLOCK = 256  # double quantization: the absmaxes are 8-bit, with one fp32 absmax per 256 of them
CHUNK_ROWS = 1024  # tunelab.losses.CHUNK_TOKENS: rows of logits the chunked loss holds at once (GPU)
# On CPU, glibc's malloc keeps freed heap memory for reuse instead of returning it, so peak RSS exceeds the
# peak of live tensors. Measured on SmolLM2 LoRA (quickstart, 2 steps): peak RSS 3248 MiB with the default
# allocator, 2627 MiB with MALLOC_MMAP_THRESHOLD_=131072 (large blocks always returned): 621 MiB retained,
# 0.52 of that step's transient tensors (activations + autocast copies + loss).
CPU_HEAP_RETENTION = 0.5
# QLoRA keeps about all of it: bitsandbytes dequantizes each NF4 weight into a fresh buffer for every matmul,
# forward and backward, between the activations' allocations. Measured on the whole quickstart run (SmolLM2,
# 48 steps): peak RSS 4,924 MiB with the default allocator, 3,183 MiB with MALLOC_MMAP_THRESHOLD_=131072: 1,741
# MiB kept, 0.93 of the estimate's transient tensors for the run's largest possible batch (1,871 MiB), which is
# larger than any batch that run drew (the largest, 790 tokens, saved 985 MiB for backward); the estimate's other
# terms came to 81 MiB under the 3,183, hence 0.95.
CPU_HEAP_RETENTION_QLORA = 0.95


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, counted on a meta-device copy of the model and its PEFT wrapper."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    base_params: int  # every parameter of the base model (tied embeddings counted once)
    linear_params: int  # weights of the decoder's Linear layers: what NF4 quantizes, what autocast copies
    head_params: int  # the output projection (the embedding matrix when tied)
    trainable_params: int  # what the method trains: adapter parameters, or every parameter for full
    adapter_params: int  # parameters the method adds to the base (0 for full fine-tuning)
    adapted_inputs: int  # per layer: sum of in_features of the Linear layers that carry a LoRA branch


@dataclass(frozen=True)
class Workload:
    """How the model is trained: method, precision and the largest batch the run will see."""

    method: str  # lora | qlora | full | ia3 | prompt_tuning | prefix_tuning
    tokens: int  # tokens in one forward pass (rows x padded length, or the sum of lengths when padding-free)
    attention_span: int  # keys each query's mask row covers: the padded row length; 0 when padding-free (no mask)
    target_tokens: int  # positions with a label (the chunked loss projects only these onto the vocabulary)
    compute_bytes: int  # 2 under bf16/fp16 autocast, 4 in float32
    attention_probs: int = 0  # softmax probabilities per head a layer keeps (tunelab's CPU attention), whole step
    grouped_kv_tokens: int = 0  # tokens whose K/V backward keeps per key/value head, not repeated (CPU attention)
    gradient_checkpointing: bool = False
    chunked_loss: bool = True
    dropout_mask_bytes: int = FP32  # what each LoRA dropout keeps per element: 1 (bool mask), 4 (float noise), 0 (none)
    loss_chunk_rows: int = CHUNK_ROWS  # rows of logits the chunked loss holds at once (tunelab.losses.chunk_rows)
    fused_norms: bool = False  # tunelab's fused RMSNorm (CPU training): a trainable weight's gradient is recomputed
    double_quant: bool = True


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per term; `peak` adds them the way they coexist in a training step."""

    overhead: int  # the idle process: torch + transformers (+ MLflow) imported
    weights: int
    weight_copies: int  # low-precision copies autocast makes of fp32 weights and autograd keeps for backward
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    loss: int  # logits (or one chunk of them) and their gradient
    heap: int = 0  # CPU only: freed memory the C allocator keeps (see CPU_HEAP_RETENTION), and load-time copies

    @property
    def peak(self) -> int:
        # Activations, autocast copies and the logits peak together at the start of backward; the gradients
        # peak at its end, when most activations are already freed. Optimizer states live from step 1 on.
        return (self.overhead + self.weights + self.adapter + self.optimizer + self.heap
                + max(self.activations + self.weight_copies + self.loss, self.gradients))

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "peak": self.peak}


def nf4_bytes(params: int, double_quant: bool = True) -> int:
    """bitsandbytes NF4: half a byte per weight plus the block scales (8-bit with double quantization)."""
    blocks = params / NF4_BLOCK
    scales = blocks * 1 + blocks / NF4_DQ_BLOCK * FP32 if double_quant else blocks * FP32
    return int(params / 2 + scales)


def weight_bytes(shape: ModelShape, method: str, double_quant: bool = True) -> int:
    """The base model as loaded: NF4 decoder Linears + fp32 embeddings and norms for QLoRA, else all fp32."""
    if method == "qlora":
        return nf4_bytes(shape.linear_params, double_quant) + FP32 * (shape.base_params - shape.linear_params)
    return FP32 * shape.base_params


def layer_activation_bytes(shape: ModelShape, work: Workload) -> int:
    """Bytes one decoder layer keeps for backward, for `work.tokens` tokens.

    Per token: two fp32 residuals saved by the RMSNorms (and their normalized outputs when the norms train,
    unless tunelab's fused RMSNorm recomputes them);
    q, k, v and the attention output at compute precision saved by SDPA (k and v expanded to every head:
    with a padding or block mask transformers repeats them instead of using grouped-query attention; tunelab's
    CPU attention keeps them per key/value head for `grouped_kv_tokens`); the
    gate output, its SiLU and the up output saved by SiLU and the product; each LoRA branch's dropout mask
    (same shape as its input: bool with tunelab's integer masks, else nn.Dropout's fp32 noise) and its input
    cast to compute precision; the attention mask cast to compute precision, one row of `attention_span`
    per query; and the softmax probabilities tunelab's CPU attention keeps for short examples."""
    h, i, a = shape.hidden, shape.intermediate, work.compute_bytes
    # bitsandbytes' 4-bit matmul returns the input's dtype (fp32), where autocast's Linear returns bf16.
    linear_out = FP32 if work.method == "qlora" else a
    per_token = 2 * FP32 * h  # residual stream into each RMSNorm
    per_token += 4 * a * h + FP32 * shape.heads  # q, k, v, attention output; log-sum-exp per head
    kv_not_repeated = 2 * a * (h - h * shape.kv_heads // shape.heads) * work.grouped_kv_tokens
    per_token += 3 * linear_out * i  # gate output, SiLU(gate), up output
    per_token += a * work.attention_span  # the mask's row for this query, cast to compute precision per layer
    if work.method == "full":
        if not work.fused_norms:
            per_token += 2 * FP32 * h  # the norms' weights train: their normalized inputs are saved too
        # Each Linear saves its input for its weight gradient (in fp32 the projections sharing an input share it).
        per_token += FP32 * (3 * h + i) if a == FP32 else a * (6 * h + i)
    elif work.method in ("lora", "qlora"):
        branch = work.dropout_mask_bytes + a
        per_token += branch * shape.adapted_inputs
    return per_token * work.tokens - kv_not_repeated + a * shape.heads * work.attention_probs


def activation_bytes(shape: ModelShape, work: Workload) -> int:
    """All decoder layers, or with gradient checkpointing only each layer's input plus one layer recomputed."""
    layer = layer_activation_bytes(shape, work)
    final_norm = FP32 * shape.hidden * work.tokens
    if work.gradient_checkpointing:
        return shape.layers * FP32 * shape.hidden * work.tokens + layer + final_norm
    return shape.layers * layer + final_norm


def weight_copy_bytes(shape: ModelShape, work: Workload) -> int:
    """Low-precision copies of fp32 weights that autocast makes and backward keeps: each decoder Linear's
    (per layer, so one layer's worth under checkpointing), and the output head's with the stock loss.
    None in float32, and none for NF4 weights (dequantized per matmul, never kept)."""
    if work.compute_bytes == FP32:
        return 0
    linears = 0 if work.method == "qlora" else shape.linear_params
    if work.gradient_checkpointing:
        linears //= shape.layers
    head = 0 if work.chunked_loss else shape.head_params
    return work.compute_bytes * (linears + head)


def loss_bytes(shape: ModelShape, work: Workload) -> int:
    """The stock loss holds the logits at compute precision, their fp32 log-softmax, and two fp32 gradients
    of that size; the chunked loss holds the target positions' hidden states and their gradient (fp32), and
    one chunk of logits in compute precision, fp32, and its gradient in compute precision."""
    a, v = work.compute_bytes, shape.vocab
    if not work.chunked_loss:
        return (a + 3 * FP32) * work.tokens * v if a != FP32 else 4 * FP32 * work.tokens * v
    rows = min(work.target_tokens, work.loss_chunk_rows)
    return 2 * FP32 * shape.hidden * work.target_tokens + (2 * a + FP32) * rows * v


def heap_bytes(shape: ModelShape, work: Workload) -> int:
    """CPU: resident memory beyond live tensors. A share of each step's transient tensors the allocator keeps;
    and for QLoRA the fp32 Linear weights that loading reads before quantizing them to NF4 (measured: loading
    SmolLM2 for QLoRA raised RSS by 464 MiB, for LoRA by 60 MiB, and it did not come back down)."""
    transient = activation_bytes(shape, work) + weight_copy_bytes(shape, work) + loss_bytes(shape, work)
    loaded = FP32 * shape.linear_params if work.method == "qlora" else 0
    retention = CPU_HEAP_RETENTION_QLORA if work.method == "qlora" else CPU_HEAP_RETENTION
    return int(retention * transient) + loaded


def breakdown(shape: ModelShape, work: Workload, overhead: int, cpu_heap: bool = False) -> MemoryBreakdown:
    trainable = shape.trainable_params
    return MemoryBreakdown(
        overhead=overhead,
        weights=weight_bytes(shape, work.method, work.double_quant),
        weight_copies=weight_copy_bytes(shape, work),
        adapter=FP32 * shape.adapter_params,
        gradients=FP32 * trainable,
        optimizer=2 * FP32 * trainable,  # AdamW: first and second moments, fp32
        activations=activation_bytes(shape, work),
        loss=loss_bytes(shape, work),
        heap=heap_bytes(shape, work) if cpu_heap else 0,
    )
