"""Shared building blocks that model families compose: norms, RoPE, attention, gated MLPs, linear layers.

Attention backends (`kernels`) and the CPU layouts (`cpu`) sit below the blocks: a family calls
`attention.LayerContext.attend`, `linear.project` and `mlp.swiglu_mlp` and never sees them.
"""
