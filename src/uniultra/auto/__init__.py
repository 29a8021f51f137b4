"""Automatic (no-prompt) segmentation: training and calibrating its head (SPEC 5).

The head's modules are in uniultra.models (auto_segmenter, patch_prompt, modality_decoder, auto_checkpoint),
its predictor in uniultra.inference (auto_predictor; loading.load_predictor picks it).
"""
