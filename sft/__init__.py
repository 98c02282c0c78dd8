"""Stage 2: curriculum supervised fine-tuning with progressive activation (``sft/run.py``)."""
