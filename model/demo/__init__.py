"""The demo world, its held-out measurements and its report card: what `python demo.py` generates and judges."""
