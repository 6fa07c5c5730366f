"""The compute side, in torch: weights on the device, the Gemma 3n forward, the KV tensors, the
model runner and the sampler. The only package besides checkpoint/ and tools/ that imports torch."""
