"""K-FAC baseline estimator for curvprune through curvlinops-for-pytorch."""

__all__: list[str] = []
