"""GReg for curvprune: growing L2 regularization pruning (GReg-1, GReg-2), structured and unstructured."""

__all__: list[str] = []
