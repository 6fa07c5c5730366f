"""Offline tooling, never on the serving path: dev checkpoints and their tokenizer, exporting one
subnet as a standalone checkpoint, and memory planning."""
