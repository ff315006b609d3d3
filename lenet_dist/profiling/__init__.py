"""The profiler: per-rank traces of a window of training steps (capture.py), and `lenet-dist inspect` reading
them back (traces.py, events.py, host.py, gpu.py, compare.py; the command in inspection.py)."""
