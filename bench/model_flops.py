"""Model FLOPs of one LoRA training pass over a set of examples, for model FLOPs utilization (MFU).

Counted for a Llama-style decoder (q/k/v/o attention projections, gate/up/down MLP, an output head) with LoRA
of rank r on all seven projections of every layer ("all-linear": PEFT leaves the output head alone), the base
and the head frozen. Only matrix multiplications count, 2 FLOPs per multiply-add; norms, activations, softmax,
rotary embeddings, dropout and the optimizer are left out (each is O(tokens x hidden), well under 1%).

Per token, per layer, for each projection W (in x out) with adapters A (in x r) and B (r x out):
- forward: x W (2 in out), x A then (x A) B (2 r (in + out));
- activation gradients: dY W^T through the frozen weight (2 in out) and, through the adapter, dY B^T
  (2 r out) and d(xA) A^T (2 in r). Layer 0's q/k/v get neither: their input (the embedding) is frozen, so
  autograd does not compute a gradient for it;
- adapter weight gradients: dB = (xA)^T dY (2 r out) and dA = x^T d(xA) (2 in r); frozen weights get none.
Attention, per layer and example of n tokens with heads x head_dim = a: scores Q K^T and the weighted sum
P V cost 2 a each per (query, key) pair; pairs = n (n + 1) / 2 for causal attention (the work the model
needs), n^2 when `causal=False` (what a dense kernel that masks after computing computes). Backward: dQ and
dK from the scores, dP and dV from the sum: twice the forward.
Output head (vocab x hidden, frozen): 2 hidden vocab forward and 2 hidden vocab for the activation gradient,
at `head_tokens` positions: the positions whose logits the loss needs (the target positions) for the useful
work, or every position for a model whose head projects them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingFlops:
    """Matmul FLOPs of one training pass (forward + backward), by part."""

    frozen_forward: int  # base projections
    frozen_input_grads: int  # activation gradients through the base projections
    adapter_forward: int
    adapter_backward: int  # adapter activation gradients + adapter weight gradients
    attention: int  # forward + backward
    head: int  # forward + activation gradient
    tokens: int

    @property
    def total(self) -> int:
        return (self.frozen_forward + self.frozen_input_grads + self.adapter_forward + self.adapter_backward
                + self.attention + self.head)

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "per_token": round(self.per_token)}


def projections(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adapted projection of one layer of a Llama-style decoder."""
    d, f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def lora_training_flops(config: Any, rank: int, lengths: list[int], head_tokens: int,
                        causal: bool = True) -> TrainingFlops:
    """Matmul FLOPs of a forward and backward pass over examples of `lengths` tokens (each its own sequence:
    attention never crosses examples), with LoRA of `rank` on every projection; see the module docstring."""
    layers, tokens = config.num_hidden_layers, sum(lengths)
    shapes = projections(config)
    no_input_grad = ("q_proj", "k_proj", "v_proj")  # layer 0 only
    weights = sum(i * o for i, o in shapes.values())
    skipped_weights = sum(shapes[p][0] * shapes[p][1] for p in no_input_grad)
    skipped_inputs = sum(shapes[p][0] for p in no_input_grad)
    ins, outs = sum(i for i, _ in shapes.values()), sum(o for _, o in shapes.values())

    frozen_forward = 2 * tokens * layers * weights
    frozen_input_grads = 2 * tokens * (layers * weights - skipped_weights)
    adapter_forward = 2 * tokens * layers * rank * (ins + outs)
    adapter_weight_grads = 2 * tokens * layers * rank * (ins + outs)  # dA, dB
    # dY B^T at every adapter; d(xA) A^T except where the input needs no gradient (layer 0's q/k/v).
    adapter_input_grads = 2 * tokens * rank * (layers * outs + layers * ins - skipped_inputs)
    heads_dim = shapes["q_proj"][1]
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    attention_forward = layers * pairs * 4 * heads_dim
    head = 2 * 2 * head_tokens * config.hidden_size * config.vocab_size
    return TrainingFlops(frozen_forward=frozen_forward, frozen_input_grads=frozen_input_grads,
                         adapter_forward=adapter_forward,
                         adapter_backward=adapter_weight_grads + adapter_input_grads,
                         attention=3 * attention_forward, head=head, tokens=tokens)


def mfu(flops_per_token: float, tokens_per_second: float, peak_gflops: float) -> float:
    """Model FLOPs utilization: the model FLOPs done per second over the measured peak."""
    return flops_per_token * tokens_per_second / (peak_gflops * 1e9)
