"""The shop's fashion CLIP model, torch side (see ``model``): profiles, the tiny
checkpoint, base features, fine-tuning and retrieval metrics.

Importing this package imports nothing heavy: ``profiles``, ``retrieval_metrics``
and ``features.product_text`` are torch-free, for the API; the other modules load
torch and open_clip when imported.
"""
