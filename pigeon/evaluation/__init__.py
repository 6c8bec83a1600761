"""Evaluation: the evaluator CNN and local CLIP/DINO encoders (``evaluators``), image and feature
metrics (``metrics``), the table's rows (``methods``) and the written reports (``report``)."""
