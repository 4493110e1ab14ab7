"""Mol-LLaMA's own molecule encoder (MoleculeSTM 2D + Uni-Mol 3D -> blending -> Q-Former -> ``llm_proj``).

``encoder.from_card`` builds it for a converted specialist (``encoders.ENCODER_BUILDERS["mol-llama"]``);
``featurize`` turns SMILES into its 2D graph and seeded 3D conformer inputs (needs RDKit);
``graph2d``, ``graph3d``, ``qformer`` are its parts in plain torch; ``weights`` resolves the frozen
graph encoders' upstream files through the Hugging Face hub cache.
"""
