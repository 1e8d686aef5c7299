"""sqft-service: OpenAI-compatible fine-tuning service with SQFT methods on stock transformers + peft."""

__version__ = "0.1.0"
