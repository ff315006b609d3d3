"""Many processes as one run: joining them, naming a lost one, stopping on a signal, and `lenet-dist launch`."""
