"""How a step runs the model: the backend chosen once, the runner, the forwards, the batch and the KV cache."""
