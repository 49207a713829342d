"""Make a trained model smaller or cheaper to adapt: structured pruning of heads and neurons
(`prune`), int8 quantization for CPU inference (`quantize`), LoRA adapters (`lora`). Each opens a
run through `runs`, edits the model (recording the edit, `models.edits`) and writes a run that opens,
generates, evaluates and fine-tunes like any other."""
