"""LCL: vision-encoder pretraining on interleaved image-text data by latent compression learning.

Modules: ``config`` (typed config, presets), ``vocab`` (special tokens), ``pool`` (attentive pooling whose value and
output projections also map patch tokens into the LM), ``text`` (the causal LM), ``model`` (the whole network),
``loss`` (contrastive with gather-with-gradient, generation, regression), ``sequences`` (pair and document layouts),
``data`` (collates and datasets), ``task`` (training stage ``lcl``), ``convert`` (official open_clip checkpoints),
``encode`` (feature export) and ``evaluate`` (probe, zero-shot and retrieval on the shapes world).
See docs/lcl.md.
"""
