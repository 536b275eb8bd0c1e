"""Memory planner: will this model and its KV cache fit this GPU at this concurrency?

The arithmetic is the one the engine itself does at start-up, so the plan and
the real block count agree:

    budget   = GPU memory x gpu_memory_utilization          (per GPU)
    weights  = parameters x bytes per parameter / TP          (quantized linears shrink)
    overhead = CUDA context + activation peak of one full batch
    KV pool  = budget - weights - overhead
    blocks   = KV pool // (2 x layers x block_size x kv_heads/TP x head_dim x dtype bytes)

On CPU there is no budget to divide: the KV pool is `kv_cache_memory` GiB.
No torch import here: `pagedserve plan` must answer in a blink.

`gpus` (the GPU table), `model_shapes` (sizes of a model's weights and KV), `memory_plan` (the plan),
`startup_check` (the refusal the engine runs before loading), `plan_command` (`pagedserve plan`).
"""
