"""The BERTSep baseline on VGGSound: text queries are fixed per-label vectors from a BERT that
never saw images (google/bert_uncased_L-4_H-256_A-4: 256 wide, the size of the reference's
Linear(256, k) query head; the label itself as the text, token states mean-pooled), through
CLIPSep's query head; trained and queried with labels only. The reference's hyperparameters.

  python -m data_prep.build --dataset=vggsound --manual_dir=IN --data_dir=OUT \\
      --bert=google/bert_uncased_L-4_H-256_A-4
"""

from clipsep_jax.config import default_config


def get_config():
    config = default_config("bertsep")  # query.encoder bert, mode text, template "{}"
    config.data.name = "vggsound"
    return config
