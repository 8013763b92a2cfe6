"""Model outputs: compiled KV-cache sampling and decoding, logits processors, sequence scoring."""
