"""Libra: a decoupled vision system on a frozen-then-tuned LLaMA (routed visual experts, cross-modal bridge,
discrete autoregressive visual modelling). See docs/libra.md.

Modules: ``vocab`` (two-stream id layout), ``visual_codes`` (lookup-free quantiser and the hybrid image tokenizer),
``expert`` (low-rank visual experts and bridges), ``routing`` (per-position dispatch), ``model`` (the routed LLaMA),
``loss``, ``sequences`` (training and prompt sequences, label masking), ``text`` (the demo's text tokenizer and the
Vicuna-v1 template), ``config``, ``lm_task`` and ``tokenizer_task`` (training stages), ``generate``, ``pipeline``,
``evaluate`` (shapes-world caption F1, VQA, text-only identity), ``convert``.
"""
