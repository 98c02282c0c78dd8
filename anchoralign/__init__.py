"""AnchorAlign: joint NER and relation extraction trained on LLM-augmented data.

``from anchoralign import Extractor`` is the Python API (``anchoralign.api``). It is imported on
first use, so that ``import anchoralign.tokenize`` (the corpus builder's) does not load torch.
"""

__version__ = "0.1.0"

__all__ = ["Extraction", "Extractor"]


def __getattr__(name: str):
    if name in __all__:
        from anchoralign import api

        return getattr(api, name)
    raise AttributeError(f"module 'anchoralign' has no attribute {name!r}")
