"""Stand-in (bench/stand_ins/README.md): Live's metric logging, in dvclive's file layout."""

from dvclive.live import Live

__all__ = ["Live"]
