"""Evaluation: the project's FER classifier (the measuring stick), FID/KID and accuracy metrics, reports, ablation.

Heavy imports stay in the submodules; import what you need from them:
``classifier`` (train/load the classifier), ``metrics`` (FID, KID, confusion matrices),
``evaluation`` (``evaluate_export``, ``make_training_evaluator``), ``report`` (files and CLI),
``ablation`` (the paper's augmentation table, measured).
"""
