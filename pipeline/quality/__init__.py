"""Quality work: the single-process HF reference (the oracle), the synthetic shapes task and `crosstrim eval`."""
