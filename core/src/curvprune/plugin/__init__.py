"""The plugin system: hook specifications, the pluggy manager factory and the component registry.

Owns :mod:`.hookspecs` (the ``curvprune_*`` hooks), :mod:`.manager` (:func:`get_plugin_manager`,
:class:`PluginHost`, entry-point discovery of the group ``curvprune``) and :mod:`.registry`
(names to factories and config classes). It may import :mod:`curvprune.roles` and everything
below it. The builtin plugins (:mod:`curvprune.builtin`) sit above this layer: the manager loads
them by module name, exactly as it loads installed plugins by entry point.
"""
