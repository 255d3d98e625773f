"""Offline data preparation: TFDS builders that precompute CLIP frame embeddings and spectrograms.

The builders (``music``, ``vggsound``) and ``python -m data_prep.build`` are not written yet; see
the README's status section.
"""
