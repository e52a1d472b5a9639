"""Halyard: a hackable trainer for supervised fine-tuning and preference optimization of causal language models."""
