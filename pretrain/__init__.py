"""Stage 1: Entity Type Understanding, then Progressive Objective Activation (``pretrain/run.py``)."""
