"""Shop the look: the catalog index, prompt grounding, garment regions and look items.

Torch-free (the API imports it): vectors are numpy arrays; the towers that make
them live in ``core.ml.fashion_clip`` (workers) or run through onnxruntime
(``core.shop.onnx_encoder``, the API).
"""
