"""Checkpoint folders on the host: safetensors shards mapped read-only, the checked weight store,
and the tokenizer files. Hands out host tensors; never computes."""
