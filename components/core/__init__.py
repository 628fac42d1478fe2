"""Shared foundations: configs, storage, tracking, model loading, generation, logging."""
