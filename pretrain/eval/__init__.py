"""Evaluation of pretrained backbones (docs/evaluation.md).

- ``features``: load a teacher export or checkpoint, extract CLS and patch features from ImageFolders.
- ``knn``: weighted k-NN on the CLS (``python -m pretrain.eval.knn``).
- ``linear``: linear probes, a grid of learning rates trained in one pass (``python -m pretrain.eval.linear``).
- ``dense``: linear segmentation of the demo web's object masks (``python -m pretrain.eval.dense``).
- ``pictures``: CLS attention maps and PCA colours of patch features (``python -m pretrain.eval.pictures``).
- ``in_training``: k-NN and pictures every ``eval.every`` iterations of ``pretrain/train.py``.
- ``timm_convert``: the teacher as a timm ``VisionTransformer``, where the architecture maps.

The package imports nothing at load time, so that ``pretrain.config`` can take ``EvalConfig`` from
``pretrain.eval.config`` without an import cycle.
"""
