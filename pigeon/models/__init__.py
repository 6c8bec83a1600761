"""Tokenizer, detokenizer, backbones, mask generator, personalization module, the Pigeon model."""
