"""Pigeon: personalized image generation with large multimodal models."""

__version__ = "0.1.0"
