"""tunelab: from raw examples to a fine-tuned, evaluated, registered and served open-weights LLM."""

__version__ = "0.1.0"
