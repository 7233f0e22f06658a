"""The components that add their own checks to the configuration (mokd.config.component_check), imported together.

The schema is the ground floor and imports none of them; each registers its check when it is imported. The launch
commands import this module before they read a configuration, so none of these checks can be missing, whichever
other modules a command happens to import.
"""

from mokd.method import backbones, mokd  # noqa: F401  (the backbone and loss-kernel checks)
