"""The pipeline's seven stages; each module runs as `python -m stages.<name>`."""
