"""Stage 3, signals: ES-Merging's coefficients from embedding-space signals (paper §4, Eqs. 1-4).

* ``probe`` -- probe inputs and the hidden states they give (§4.1);
* ``layerwise`` -- SWD per block and the layer coefficients α (§4.2, Eq. 2);
* ``gradients``, ``gradient_batches``, ``element_scores`` -- per-element scores from gradients of
  token distances (§4.3), per probe (paper) or of a batch mean (official code);
* ``elementwise`` -- element coefficients β from the scores (Eq. 3);
* ``combine`` -- λ = α·β and the merged LoRA (Eqs. 4 and 1);
* ``hooks`` -- where the signals are read inside a model.
"""
