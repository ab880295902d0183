"""Tiny checkpoints and model-family adapters (encoder towers, prompts, embedding splicing) for Cornserve executors.

Modules (imported on use; most pull in torch and transformers):
`tiny` (seeded tiny checkpoints), `media` (fetch + decode media URLs), `loading` (model id -> local
directory), `families` (checkpoint layouts), `weights` (partial safetensors loading), `encoders`
(encoder tower + projector only, with the family's preprocessing), `tokenizer` (local BPE training).
"""
