"""SOSP for curvprune: second-order structured pruning (SOSP-H, SOSP-I) with global ranking."""

__all__: list[str] = []
