"""Stage 2, specialists: the base LLM, the modality encoders and the LoRA specialists merged later.

* ``base_llm`` -- each scale's base LLM (``smollm2``: the cpu base converted from its GGUF);
* ``adapters`` -- the one reader and writer of adapter and merged-model folders;
* ``encoders`` -- modality encoders and projectors, on the interface of ``raw_encoder``;
  ``mol_llama`` -- Mol-LLaMA's own molecule encoder (paper scale); ``captions`` -- the specialists' caption tasks;
* ``train`` -- LoRA training; ``load`` -- finished specialists (train, save, load);
  ``per_scale`` -- the three each scale merges (shipped and verified, smoke, paper);
  ``heldout`` -- their held-out examples;
* ``convert`` -- the published paper-scale checkpoints turned into the same layout.
"""
