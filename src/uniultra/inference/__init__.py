"""Inference: turning a trained model into masks for prompts on an image."""
