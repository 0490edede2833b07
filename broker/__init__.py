"""The Redis contract shared by gateway and workers: keys, job queue, result streams."""
