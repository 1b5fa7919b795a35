"""Tools for testing curvprune plugins."""
