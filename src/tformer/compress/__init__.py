"""Make a trained model smaller or cheaper to adapt: structured pruning of heads and neurons
(`prune`), int8 quantization for CPU inference (`quantize`), LoRA runs merged, adapters saved alone
and attached again (`lora`). Each opens a run through `runs`, edits the model (recording the edit,
`models.edits`) and writes, through `output.write_run`, a new run that opens, generates, evaluates
and fine-tunes like any other.

    from tformer.compress.prune import prune_run
    from tformer.compress.quantize import quantize_run
    from tformer.compress.lora import merge_lora, save_adapters, attach_adapters
"""
