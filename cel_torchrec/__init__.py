"""Clustered Embedding Learning on TorchRec."""
