"""`lenet-dist predict`: your own images (read by photos.py, framed 28×28 by frames.py) classified by classify.py."""
