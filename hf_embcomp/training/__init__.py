"""Everything that trains weights, in one place (no heavy imports here: the CLI imports this package).

- :mod:`.rows`: the minibatch loop every learned method fits its rows with (Accelerate).
- :mod:`.parts`: which parts of a compressed model train in a fine-tune (``hf_embcomp.trainable_parts``).
- :mod:`.distill`: knowledge distillation from the uncompressed teacher (Trainer), its data and loader.
- :mod:`.recover`: recovery after any method: KD of the embedding's real-valued tensors (+ LoRA on the
  backbone, merged back), kept only if held-out text says it is better.
- :mod:`.refit`: the head-side refit that ends a calibrated fit of a tied causal LM (KL of the next-token
  distribution on cached head inputs; :func:`hf_embcomp.core.refit`).
- :mod:`.downstream`: the step-budgeted task fine-tune the GLUE / SQuAD evaluation suites share.
- :mod:`.cli`: ``hf-embcomp recover`` (alias ``distill``).
"""
