"""Tiny checkpoints and model-family adapters (encoder towers, prompts, embedding splicing) for Cornserve executors."""
