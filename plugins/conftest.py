"""pytest configuration for the plugins folder.

``_template`` is a skeleton for third-party plugins to copy; its test only makes sense once
the template itself is installed, so the repository's own test run does not collect it.
"""

collect_ignore = ["_template"]
