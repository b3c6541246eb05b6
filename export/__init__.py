"""Host-side exporter (needs torch and onnx): installed as ``edgebll.export``."""
