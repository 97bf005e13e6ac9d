"""The estimate as a rich table (people) or JSON (machines)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tunelab.estimate import Estimate

MEMORY_ROWS = (
    ("overhead", "framework (idle process, measured)"),
    ("weights", "base weights"),
    ("adapter", "adapter weights"),
    ("optimizer", "AdamW states (2 x fp32 of trainable)"),
    ("gradients", "gradients (fp32 of trainable)"),
    ("activations", "activations saved for backward"),
    ("weight_copies", "autocast weight copies kept for backward"),
    ("loss", "logits and their gradient"),
    ("heap", "freed memory the CPU allocator keeps"),
)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_estimate(est: Estimate, out: Console) -> None:
    s, d, m = est.shape, est.data, est.memory
    table = Table(title=f"tunelab estimate ({est.precision})")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("parameters (base)", f"{s.base_params:,}")
    share = 100 * s.trainable_params / (s.base_params + s.adapter_params)
    table.add_row("trainable", f"{s.trainable_params:,} ({share:.2f}%)")
    table.add_row("training examples / tokens per epoch", f"{d.examples:,} / {d.tokens:,}")
    table.add_row("largest forward pass", f"{d.peak_tokens:,} tokens (longest example {d.max_length})")
    table.add_section()
    for key, label in MEMORY_ROWS:
        table.add_row(label, _mib(getattr(m, key)))
    peak = f"[bold]{_mib(m.peak)}[/]"
    if est.fits is not None:
        verdict = "[green]fits[/]" if est.fits else "[red]does not fit[/]"
        peak += f" of {est.memory_limit_gib:g} GiB: {verdict}"
    table.add_row("[bold]peak memory[/]", peak)
    table.add_section()
    table.add_row("optimizer steps", f"{est.steps:,}")
    table.add_row("time", _duration(est.seconds) if est.seconds is not None else "-")
    table.add_row("  from", est.time_source)
    cost = f"${est.cost_usd:,.2f}" if est.cost_usd is not None else "-"
    table.add_row("cost", f"{cost} at ${est.usd_per_hour:g}/h")
    table.add_row("  price", est.price_source)
    out.print(table)
    for note in est.notes:
        out.print(f"note: {note}")
