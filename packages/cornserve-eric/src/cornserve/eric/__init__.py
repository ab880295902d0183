"""Eric: Cornserve's multimodal encoder executor (HTTP server sending embeddings through the sidecar)."""
