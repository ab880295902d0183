"""The CPU LLM executor: an OpenAI-compatible chat server on transformers that takes multimodal embeddings from the sidecar."""
