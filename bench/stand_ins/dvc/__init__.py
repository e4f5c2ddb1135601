"""Stand-in (bench/stand_ins/README.md): only what stages.common.fragile touches."""
