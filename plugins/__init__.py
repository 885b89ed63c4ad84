"""cogradctl's built-in model plugins (installed as the package ``cogradctl_plugins``).

Each registers in the ``cogradctl.models`` entry-point group exactly like a third-party plugin.
"""
