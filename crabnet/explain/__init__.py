"""The explanation wing: capture stores (writer and reader), the capturing training of step 1, attributions,
faithfulness, videos and per-element views of step 2, and ``python -m crabnet.explain`` for any checkpoint."""
