"""The continuous-batching loop: scheduling, KV blocks, sequences, sampling, detokenizing, stop strings."""
