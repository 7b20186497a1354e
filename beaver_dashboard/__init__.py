"""The web dashboard of beaver's server: static files that ``beaver_server`` serves at ``/ui``.

``index.html``, ``dashboard.js`` and ``dashboard.css`` are plain files (no build step, no
third-party code); this package only ships them next to ``beaver_server``.
"""
