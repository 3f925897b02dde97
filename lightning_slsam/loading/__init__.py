"""Loading with one-line errors: weights and checkpoint files (``checkpoint_files``) and optional packages
(``optional_dependencies``); used by ``models``, ``data`` and the app, imports none of them."""
