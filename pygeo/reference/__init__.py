"""Pure-PyTorch references: the CPU fallback, the test oracle and the benchmark baseline of every op."""
