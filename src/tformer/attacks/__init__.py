"""Adversarial perturbations of a classifier's input, asked of the model by capability
(`ImageClassifier`, `TextClassifier`), never by family: `image` (FGSM, PGD in L-inf and L2 in
pixel space), `text` (typos, word substitutions from the model's own embedding neighbours,
HotFlip-style token flips; `words` holds the words of a text and a word's typos) and `embedding` (perturbations of token embeddings, for adversarial
training of text classifiers).

Rank 6, beside `inference`: below `training`, whose adversarial training uses these attacks, and
below `analysis`, whose robustness reports run them. Imports models, runs, nn, data, metrics.
"""
