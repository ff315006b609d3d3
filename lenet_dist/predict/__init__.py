"""`lenet-dist predict`: your own images (photos.py reads them, frames.py makes each a 28×28 frame) classified by a
trained run (classify.py)."""
