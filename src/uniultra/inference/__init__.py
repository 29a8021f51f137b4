"""Inference: any checkpoint to a ready predictor (`loading.load_predictor`), and the predictors that
turn prompts on an image into masks (`predictor`, `auto_predictor`, `zoom`, `onnx_predictor`)."""
