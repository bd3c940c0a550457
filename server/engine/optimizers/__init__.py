"""The classes of `tf_keras.optimizers`, one module each: a `core.Core` (build and update_step) per class.

Adding a class is its module here, its config table in `engine.config`
(`CONFIG_CLASSES`, `_CLASS_CHECKS`) and its golden cases.
"""

from typing import Any

from optserve.server.engine.core import Core
from optserve.server.engine.optimizers import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    ftrl,
    lion,
    nadam,
    rmsprop,
    sgd,
)

CORES: dict[str, Core] = {
    "SGD": sgd.CORE,
    "RMSprop": rmsprop.CORE,
    "Adagrad": adagrad.CORE,
    "Adadelta": adadelta.CORE,
    "Adam": adam.CORE,
    "AdamW": adam.CORE,  # tf-keras's AdamW is Adam's update_step; its decay is the pipeline's weight_decay
    "Adamax": adamax.CORE,
    "Nadam": nadam.CORE,
    "Ftrl": ftrl.CORE,
    "Lion": lion.CORE,
    "Adafactor": adafactor.CORE,
}


def core_of(config: Any) -> Core:
    """The core of a config's class (`config.class_name`)."""
    return CORES[config.class_name]
