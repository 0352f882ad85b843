"""CPU kernels compiled on the machine that runs them (XLA FFI custom calls, C++).

XLA's CPU backend runs the decoder's skinny matmuls (a decode step's 1-32 rows against every
weight) at 20-40% of the memory bandwidth; `skinny_matmul.cc` streams pre-packed bfloat16
weights at close to it, and `gguf_matmul.cc` multiplies by a GGUF file's packed blocks
(Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K) without widening the weights in memory. `build.library()`
compiles the sources with the machine's C++ compiler on first use (a few seconds, cached per
source, jaxlib and CPU); without a compiler, or with XLASERVE_CPU_KERNELS=0, the engine keeps
XLA's own matmuls.
"""
