"""AnchorAlign: joint NER and relation extraction trained on LLM-augmented data."""

__version__ = "0.1.0"
