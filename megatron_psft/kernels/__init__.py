"""Vocab-parallel log-probs and entropy: the local stats -> TP combine -> gradient kernels (torch, Triton) and the output layer fused with them."""
