"""celslm: cloud-edge collaborative language model inference over shared KV artifacts."""

__version__ = "0.1.0"
