"""The bundled demo model: procedural data (data.py), training (train.py) and evaluation (evaluate.py)."""
