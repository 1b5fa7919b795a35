"""curvprune's own plugins, registered through the same hooks as installed plugins."""
