"""The components that add their own checks and choices to the configuration, imported together.

The schema is the ground floor and imports none of them; each registers its checks (mokd.config.component_check)
and the values of the options it implements (mokd.config.register_choices, from its mokd.registry.Registry) when it
is imported. The launch commands import this module before they read a configuration, so none of them can be
missing, whichever other modules a command happens to import.
"""

from mokd.data import sources  # noqa: F401  (data.source)
from mokd.engine import optim, strategies  # noqa: F401  (modelN.optim.name, parallel.strategy)
from mokd.kernels import attention, dino_cross_entropy  # noqa: F401  (head.attention, loss.kernel)
from mokd.method import backbones, mokd  # noqa: F401  (modelN.backbone and its family's options, the loss-kernel check)
