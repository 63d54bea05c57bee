"""Reversible (RevNet additive-coupling) containers for PyTorch with flat activation memory in depth."""
