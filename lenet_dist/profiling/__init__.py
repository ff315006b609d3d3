"""The profiler: capturing a window of training steps per rank (capture.py), and `lenet-dist inspect` reading
the traces back: the files (traces.py, events.py), the host and GPU views (host.py, gpu.py), A against B
(compare.py), the command (inspection.py)."""
