"""``/v1/models``: the base models of the caller's jobs and every fine-tuned model derived from them."""
